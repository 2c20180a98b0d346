//! The web dashboard over HTTP (issue 15), against a real control plane on both databases:
//! sign-in and sessions, roles and CSRF on the forms, escaping of hostile text, and the live
//! streams (a build's log lines appended after connecting; the list's rows).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{api, api_as, http, start, start_with, Api, HttpReply};
use hive_control_plane::store::{BuildRow, Store};
use hive_proto::v1::{self as pb, BuildState, LogStream};
use hive_testkit::fakebox::{FakeBox, FakeBoxConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(15);

async fn token(admin: &mut Api, role: &str) -> String {
    admin
        .create_token(pb::CreateTokenRequest {
            role: role.into(),
            project: String::new(),
            name: format!("ui-{role}"),
        })
        .await
        .unwrap_or_else(|s| panic!("create {role} token: {s}"))
        .into_inner()
        .token
}

async fn project(admin: &mut Api, name: &str) {
    admin
        .create_project(pb::CreateProjectRequest {
            name: name.into(),
            repo_url: format!("https://git.example/acme/{name}"),
            secret: "webhook-secret-value".into(),
            steps: vec!["make".into(), "make test".into()],
            env: [("API_KEY".to_string(), "env-secret-value".to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("create project");
}

async fn submit(admin: &mut Api, project: &str) -> String {
    admin
        .submit_build(pb::SubmitBuildRequest {
            project: project.into(),
            revision: "0123456789abcdef0123456789abcdef01234567".into(),
            git_ref: "refs/heads/main".into(),
            ..Default::default()
        })
        .await
        .expect("submit build")
        .into_inner()
        .id
}

async fn get(addr: SocketAddr, path: &str, cookie: &str) -> HttpReply {
    let c = format!("hive_session={cookie}");
    let headers: Vec<(&str, &str)> = if cookie.is_empty() {
        vec![]
    } else {
        vec![("Cookie", c.as_str())]
    };
    http(addr, "GET", path, &headers, b"").await
}

async fn post(addr: SocketAddr, path: &str, cookie: &str, form: &[(&str, &str)]) -> HttpReply {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let c = format!("hive_session={cookie}");
    let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
    if !cookie.is_empty() {
        headers.push(("Cookie", c.as_str()));
    }
    http(addr, "POST", path, &headers, body.as_bytes()).await
}

/// Signs in with `token`; returns the session cookie's value.
async fn sign_in(addr: SocketAddr, token: &str) -> String {
    let r = post(
        addr,
        "/ui/signin",
        "",
        &[("token", token), ("next", "/ui/boxes")],
    )
    .await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/ui/boxes"));
    let cookie = r.header("set-cookie").expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(!cookie.contains(token));
    cookie
        .strip_prefix("hive_session=")
        .and_then(|c| c.split(';').next())
        .expect("cookie value")
        .to_string()
}

/// The CSRF token a page's forms carry.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    page[at..].split('"').next().unwrap().to_string()
}

async fn state_of(admin: &mut Api, id: &str) -> BuildState {
    let b = admin
        .get_build(pb::GetBuildRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    BuildState::try_from(b.state).unwrap()
}

async fn unauthenticated_is_sent_to_sign_in(url: String) {
    let handle = start(&url).await;
    let addr = handle.http_addr;
    for path in [
        "/ui/builds",
        "/ui/builds/events",
        "/ui/builds/x/log.txt",
        "/ui/boxes",
        "/ui/projects",
        "/ui/networks",
    ] {
        let r = get(addr, path, "").await;
        assert_eq!(r.status, 303, "{path}: {r:?}");
        assert!(
            r.header("location").unwrap().starts_with("/ui/signin"),
            "{path}: {r:?}"
        );
        // A made-up session is no session.
        let r = get(addr, path, &"ab".repeat(32)).await;
        assert_eq!(r.status, 303, "{path}: {r:?}");
    }
    let r = get(addr, "/ui/builds", "").await;
    assert_eq!(r.header("location"), Some("/ui/signin?next=/ui/builds"));
    let r = post(addr, "/ui/builds/x/cancel", "", &[("csrf", "x")]).await;
    assert_eq!(r.status, 303, "{r:?}");
    // The sign-in page and the assets need no session.
    let r = get(addr, "/ui/signin", "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("<label for=\"token\">API token</label>"));
    assert!(r
        .header("content-security-policy")
        .unwrap()
        .contains("script-src 'self'"));
    assert_eq!(get(addr, "/ui/static/ui.css", "").await.status, 200);
    assert_eq!(get(addr, "/ui/static/ui.js", "").await.status, 200);

    // A bad token is refused, with no cookie.
    for bad in ["", "hvt_nope", &"x".repeat(5000)] {
        let r = post(addr, "/ui/signin", "", &[("token", bad)]).await;
        assert!(r.status == 401 || r.status == 400, "{bad:.20}: {r:?}");
        assert!(r.header("set-cookie").is_none());
    }
    // A browser saying the form came from another site is refused, sign-in included.
    let admin_token = handle.admin_token().unwrap().to_string();
    let body = format!("token={admin_token}");
    for site in ["cross-site", "same-site"] {
        let r = http(
            addr,
            "POST",
            "/ui/signin",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Sec-Fetch-Site", site),
            ],
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 403, "{site}: {r:?}");
        assert!(r.header("set-cookie").is_none());
    }
    // An open redirect is not followed.
    let r = post(
        addr,
        "/ui/signin",
        "",
        &[("token", &admin_token), ("next", "https://evil.example/")],
    )
    .await;
    assert_eq!(r.header("location"), Some("/ui/builds"));

    // A good one signs in; no page shows the token; signing out ends the session.
    let cookie = sign_in(addr, &admin_token).await;
    let page = get(addr, "/ui/builds", &cookie).await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("admin (admin)"), "{}", page.body);
    assert!(!page.body.contains(&admin_token));
    let csrf = csrf_of(&page.body);
    let r = post(addr, "/ui/signout", &cookie, &[("csrf", "wrong")]).await;
    assert_eq!(r.status, 403);
    let r = post(addr, "/ui/signout", &cookie, &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 303);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(get(addr, "/ui/builds", &cookie).await.status, 303);

    // A revoked token's session ends at once.
    let mut admin = api(&handle).await;
    let r = admin
        .create_token(pb::CreateTokenRequest {
            role: "read-only".into(),
            project: String::new(),
            name: "soon-revoked".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cookie = sign_in(addr, &r.token).await;
    assert_eq!(get(addr, "/ui/builds", &cookie).await.status, 200);
    admin
        .revoke_token(pb::RevokeTokenRequest {
            id: r.info.unwrap().id,
        })
        .await
        .unwrap();
    assert_eq!(get(addr, "/ui/builds", &cookie).await.status, 303);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => unauthenticated_is_sent_to_sign_in);

async fn read_only_sees_operators_act(url: String) {
    let handle = start(&url).await;
    let addr = handle.http_addr;
    let mut admin = api(&handle).await;
    project(&mut admin, "demo").await;
    let id = submit(&mut admin, "demo").await;

    // Read-only: sees the build, no buttons, and a forged POST is refused.
    let ro = sign_in(addr, &token(&mut admin, "read-only").await).await;
    let page = get(addr, &format!("/ui/builds/{id}"), &ro).await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("demo"));
    assert!(!page.body.contains("/cancel\""), "{}", page.body);
    assert!(!page.body.contains("/rebuild\""));
    let csrf = csrf_of(&page.body); // the sign-out form's
    let r = post(
        addr,
        &format!("/ui/builds/{id}/cancel"),
        &ro,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.body.contains("needs a token with role submitter"),
        "{}",
        r.body
    );
    let r = post(
        addr,
        &format!("/ui/builds/{id}/rebuild"),
        &ro,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(state_of(&mut admin, &id).await, BuildState::Queued);

    // Read-only sees projects without secrets (env names only), the fleet and networks.
    let p = get(addr, "/ui/projects/demo", &ro).await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("API_KEY"));
    assert!(!p.body.contains("env-secret-value") && !p.body.contains("webhook-secret-value"));
    assert_eq!(get(addr, "/ui/projects", &ro).await.status, 200);
    assert_eq!(get(addr, "/ui/boxes", &ro).await.status, 200);
    admin
        .create_network(pb::CreateNetworkRequest {
            name: "corp".into(),
            prefixes: vec!["10.20.0.0/16".into()],
            tunnel_subnet: String::new(),
        })
        .await
        .expect("create network");
    let n = get(addr, "/ui/networks", &ro).await;
    assert_eq!(n.status, 200);
    assert!(
        n.body.contains("corp") && n.body.contains("10.20.0.0/16"),
        "{}",
        n.body
    );
    assert_eq!(get(addr, "/ui/builds/nope", &ro).await.status, 404);
    assert_eq!(get(addr, "/ui/builds?state=bogus", &ro).await.status, 400);

    // A submitter bound to another project: sees this build, cannot act on it.
    project(&mut admin, "other").await;
    let sub_token = admin
        .create_token(pb::CreateTokenRequest {
            role: "submitter".into(),
            project: "other".into(),
            name: "sub-other".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let sub = sign_in(addr, &sub_token).await;
    let page = get(addr, &format!("/ui/builds/{id}"), &sub).await;
    assert_eq!(page.status, 200);
    assert!(!page.body.contains("/cancel\""), "{}", page.body);
    let csrf = csrf_of(&page.body);
    let r = post(
        addr,
        &format!("/ui/builds/{id}/cancel"),
        &sub,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.body
            .contains("may only submit and cancel builds of project"),
        "{}",
        r.body
    );
    assert_eq!(state_of(&mut admin, &id).await, BuildState::Queued);

    // Operator: the buttons; a form without this session's CSRF token is refused.
    let op = sign_in(addr, &token(&mut admin, "operator").await).await;
    let page = get(addr, &format!("/ui/builds/{id}"), &op).await;
    assert!(page
        .body
        .contains(&format!("action=\"/ui/builds/{id}/cancel\"")));
    let csrf = csrf_of(&page.body);
    let r = post(addr, &format!("/ui/builds/{id}/cancel"), &op, &[]).await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = post(
        addr,
        &format!("/ui/builds/{id}/cancel"),
        &op,
        &[("csrf", "0000")],
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    // Another session's token is not this one's.
    let r = post(
        addr,
        &format!("/ui/builds/{id}/cancel"),
        &op,
        &[("csrf", &csrf_of(&get(addr, "/ui/builds", &ro).await.body))],
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(state_of(&mut admin, &id).await, BuildState::Queued);
    let r = post(
        addr,
        &format!("/ui/builds/{id}/cancel"),
        &op,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("/ui/builds/{id}").as_str())
    );
    assert_eq!(state_of(&mut admin, &id).await, BuildState::Cancelled);
    // Cancelling again: it has ended.
    let r = post(
        addr,
        &format!("/ui/builds/{id}/cancel"),
        &op,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status, 409, "{r:?}");
    // Rebuild queues a new build of the same code.
    let r = post(
        addr,
        &format!("/ui/builds/{id}/rebuild"),
        &op,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status, 303, "{r:?}");
    let new_id = r
        .header("location")
        .unwrap()
        .strip_prefix("/ui/builds/")
        .unwrap()
        .to_string();
    assert_ne!(new_id, id);
    let b = admin
        .get_build(pb::GetBuildRequest { id: new_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.trigger, format!("rebuild:{id}"));
    // The list filters by project and state.
    let list = get(addr, "/ui/builds?project=demo&state=cancelled", &op).await;
    assert!(list.body.contains(&format!("id=\"b-{id}\"")));
    assert!(!list.body.contains(&format!("id=\"b-{}\"", b.id)));
    handle.shutdown().await;
}
hive_testkit::on_both!(db => read_only_sees_operators_act);

async fn hostile_text_is_escaped(url: String) {
    let handle = start(&url).await;
    let addr = handle.http_addr;
    let mut admin = api(&handle).await;
    project(&mut admin, "demo").await;
    // Straight into the store: a ref the API might refuse is still shown safely.
    let store: &Store = handle.store();
    let p = store.get_project("demo").await.unwrap().unwrap();
    let mut b = BuildRow::new_queued(
        &p,
        "<img src=x onerror=alert(2)>",
        "refs/heads/<script>alert(1)</script>",
        "api",
    );
    b.message = "\"><script>alert(3)</script>".into();
    store.insert_build(&b, "hostile").await.unwrap();
    store
        .append_system_log(
            &b.id,
            "\x1b[31m<script>alert(4)</script>\x1b[0m & <b onmouseover=x>\n",
        )
        .await
        .unwrap();
    let cookie = sign_in(addr, handle.admin_token().unwrap()).await;
    for path in ["/ui/builds".to_string(), format!("/ui/builds/{}", b.id)] {
        let r = get(addr, &path, &cookie).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        for bad in ["<script>alert", "<img src=x", "<b onmouseover"] {
            assert!(!r.body.contains(bad), "{path} carries {bad}: {}", r.body);
        }
        assert!(
            r.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{path}"
        );
    }
    let page = get(addr, &format!("/ui/builds/{}", b.id), &cookie).await;
    assert!(
        page.body
            .contains("<span class=\"f1\">&lt;script&gt;alert(4)&lt;/script&gt;</span>"),
        "{}",
        page.body
    );
    assert!(page.body.contains("href=\"#L1\""));
    // Live rows are the same escaped markup: a rebuild (same hostile ref) arrives on the
    // list's stream.
    let mut list = Sse::open(addr, "/ui/builds/events", &cookie).await;
    let again = admin
        .rebuild_build(pb::RebuildBuildRequest { id: b.id.clone() })
        .await
        .expect("rebuild")
        .into_inner()
        .id;
    list.until(&format!("id=\"b-{again}\"")).await;
    let seen = list.until("</tr>").await.to_string();
    assert!(
        seen.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{seen}"
    );
    assert!(
        !seen.contains("<script>") && !seen.contains("<img src=x"),
        "{seen}"
    );
    // The raw log is the bytes, as text that no browser sniffs into HTML.
    let raw = get(addr, &format!("/ui/builds/{}/log.txt", b.id), &cookie).await;
    assert_eq!(raw.status, 200);
    assert!(raw
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(raw.header("x-content-type-options"), Some("nosniff"));
    assert!(raw.body.contains("<script>alert(4)</script>"));
    handle.shutdown().await;
}
hive_testkit::on_both!(db => hostile_text_is_escaped);

/// An open event stream: raw HTTP/1.1, read as it comes.
struct Sse {
    s: tokio::net::TcpStream,
    seen: String,
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, cookie: &str) -> Sse {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: hive_session={cookie}\r\n\
             Accept: text/event-stream\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut sse = Sse {
            s,
            seen: String::new(),
        };
        sse.until("\r\n\r\n").await;
        assert!(sse.seen.starts_with("HTTP/1.1 200"), "{}", sse.seen);
        assert!(sse.seen.contains("text/event-stream"), "{}", sse.seen);
        sse
    }

    /// Reads until `needle` has arrived; returns all read so far.
    async fn until(&mut self, needle: &str) -> &str {
        let deadline = tokio::time::Instant::now() + T;
        while !self.seen.contains(needle) {
            let mut buf = [0u8; 8192];
            let n = tokio::time::timeout_at(deadline, self.s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} within {T:?}; got:\n{}", self.seen))
                .unwrap();
            assert!(n > 0, "stream ended before {needle:?}; got:\n{}", self.seen);
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        &self.seen
    }
}

async fn live_streams_follow_the_build(url: String) {
    // Streams answer within the HTTP timeout, then go on past it.
    let handle = start_with(&url, |c| c.http_timeout = Duration::from_secs(1)).await;
    let addr = handle.http_addr;
    let mut admin = api(&handle).await;
    project(&mut admin, "demo").await;
    let cookie = sign_in(addr, handle.admin_token().unwrap()).await;
    let mut list = Sse::open(addr, "/ui/builds/events?project=demo", &cookie).await;

    let mut fb = FakeBox::connect(
        &format!("http://{}", handle.grpc_addr),
        FakeBoxConfig::new("box-ui", "small", 1, 1),
    )
    .await
    .expect("fake box");
    let id = submit(&mut admin, "demo").await;
    // The list hears of the new build.
    list.until(&format!("id=\"b-{id}\"")).await;
    let a = fb.next_assignment(T).await.expect("assignment");
    fb.accept(&a, "cell-7", false).await;
    fb.running(&a).await;
    list.until("s-running").await;

    // The build's stream: its summary, then lines stored after it connected.
    let page = get(addr, &format!("/ui/builds/{id}"), &cookie).await;
    assert!(page
        .body
        .contains(&format!("/ui/builds/{id}/events?seq=0&amp;line=1")));
    let mut live = Sse::open(
        addr,
        &format!("/ui/builds/{id}/events?seq=0&line=1"),
        &cookie,
    )
    .await;
    live.until("event: build").await;
    assert!(!live.seen.contains("event: log"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fb.log(&a, LogStream::Stdout, 0, b"hello \x1b[32mfrom")
        .await;
    fb.log(
        &a,
        LogStream::Stdout,
        0,
        b" the box\x1b[0m\nsecond <line>\n",
    )
    .await;
    let seen = live.until("id=\"L2\"").await;
    assert!(
        seen.contains("hello <span class=\"f2\">from the box</span>"),
        "{seen}"
    );
    assert!(seen.contains("second &lt;line&gt;"), "{seen}");
    assert!(seen.contains("id: 2:3"), "{seen}");
    // Step 1's output starts on line 3: the stream says so (numbers only).
    fb.log(&a, LogStream::System, 1, b"$ make\n").await;
    let seen = live.until("id: 3:4").await;
    assert!(seen.contains("event: step\ndata: 1:3\n"), "{seen}");
    fb.finish(&a, BuildState::Succeeded, 0).await;
    live.until("event: end").await;
    assert!(live.seen.contains("s-succeeded"), "{}", live.seen);
    list.until("s-succeeded").await;

    // A reconnecting browser resumes where it left off (Last-Event-ID), past the end.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ui/builds/{id}/events HTTP/1.1\r\nHost: {addr}\r\nCookie: hive_session={cookie}\r\n\
         Last-Event-ID: 3:4\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut raw))
        .await
        .expect("an ended build's stream ends")
        .unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(
        raw.contains("event: end") && !raw.contains("event: log"),
        "{raw}"
    );
    handle.shutdown().await;
    let _ = api_as;
}
hive_testkit::on_both!(db => live_streams_follow_the_build);
