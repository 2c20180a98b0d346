//! Issue 14, commit statuses back to the forges, against a real control plane (SQLite file and
//! PostgreSQL), the test kit's `FakeBox`, and fake GitHub, GitLab and Gitea APIs: real HTTP
//! servers on loopback that record every call and can fail, close, stall, answer a huge body
//! or redirect. Checked: the exact status sequence of a succeeded, a failed, a cancelled and a
//! timed-out build on each forge; retries through an outage, in order, while builds go on
//! undelayed; a GitHub App's installation tokens, refreshed before they expire; hostile forges
//! that cannot stall the sender or the control plane; two control planes on one PostgreSQL
//! sending each status once; and the settings' checks (no token ever returned).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{api, api_as, push_signed, start_with, Api, FakeBox, FakeBoxConfig};
use hive_control_plane::server::Handle;
use hive_proto::v1::{
    BuildState, CancelBuildRequest, CreateProjectRequest, ForgeStatusReply, ForgeStatusRequest,
    GetBuildRequest, SubmitBuildRequest,
};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(15);
const SECRET: &str = "hook-secret";
const PUBLIC: &str = "https://hive.example";

// ---------------------------------------------------------------------------------------------
// The fake forge: a raw HTTP/1.1 server, so it can also misbehave at the connection level.

/// How the fake answers a status call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Created,
    Fail500,
    /// Closes the connection without a word.
    Close,
    /// Reads the request, then says nothing for a minute.
    Stall,
    /// 200 with a body of 100 MiB, written as fast as the client reads.
    Huge,
    /// 302 elsewhere.
    Redirect,
    /// 422 with the request's credentials in the body.
    Echo,
}

#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
    answer: Answer,
}

impl Call {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A GitHub App the fake knows: its id and public key (PKCS#1 DER).
struct App {
    id: u64,
    public_der: Vec<u8>,
    /// How long an installation token lives (GitHub: an hour).
    token_life: Duration,
    issued: Vec<(String, Instant)>,
}

#[derive(Default)]
struct FakeState {
    calls: Vec<Call>,
    /// How status calls are answered (None: 201).
    default: Option<Answer>,
    app: Option<App>,
    in_flight: usize,
    max_in_flight: usize,
    jwt_seen: usize,
}

#[derive(Clone)]
struct Fake {
    addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
}

impl Fake {
    async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Fake {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
        };
        let f = fake.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let f = f.clone();
                tokio::spawn(async move { f.serve(conn).await });
            }
        });
        fake
    }

    fn base(&self, prefix: &str) -> String {
        format!("http://{}{prefix}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    fn set_default(&self, a: Answer) {
        self.lock().default = Some(a);
    }

    /// Status calls (not the App's token calls), in arrival order.
    fn status_calls(&self) -> Vec<Call> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.path.contains("/statuses/"))
            .cloned()
            .collect()
    }

    /// The statuses the forge took (answered 201) for commit `sha`: (state, description).
    fn accepted(&self, sha: &str) -> Vec<(String, String)> {
        self.status_calls()
            .into_iter()
            .filter(|c| {
                c.path.ends_with(&format!("/statuses/{sha}")) && c.answer == Answer::Created
            })
            .map(|c| {
                (
                    c.body["state"].as_str().unwrap_or("").to_string(),
                    c.body["description"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    async fn wait_accepted(&self, sha: &str, n: usize) -> Vec<(String, String)> {
        let t0 = Instant::now();
        loop {
            let got = self.accepted(sha);
            if got.len() >= n {
                return got;
            }
            assert!(
                t0.elapsed() < WAIT,
                "{sha}: {n} statuses expected, the forge took {got:?}; calls: {:?}",
                self.status_calls()
                    .iter()
                    .map(|c| (c.path.clone(), c.answer))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The same fake over TLS with `chain` and `key` (PEM).
    async fn start_tls(chain: &str, key: &str) -> Fake {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Fake {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
        };
        let f = fake.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (f, acceptor) = (f.clone(), acceptor.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(conn).await {
                        f.serve(tls).await;
                    }
                });
            }
        });
        fake
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, mut conn: S) {
        {
            let mut s = self.lock();
            s.in_flight += 1;
            s.max_in_flight = s.max_in_flight.max(s.in_flight);
        }
        let _ = self.answer(&mut conn).await;
        self.lock().in_flight -= 1;
    }

    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(&self, conn: &mut S) -> std::io::Result<()> {
        let Some((method, path, headers, body)) = read_request(conn).await else {
            return Ok(());
        };
        let bearer = headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .and_then(|(_, v)| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_string();
        let is_status = path.contains("/statuses/");
        // The App's calls: the installation, then a token.
        if !is_status && self.lock().app.is_some() {
            let ok = self.jwt_ok(&bearer);
            let (code, reply) = if !ok {
                (
                    401,
                    json!({"message": "A JSON web token could not be decoded"}),
                )
            } else if method == "GET" && path.ends_with("/installation") {
                (200, json!({"id": 77}))
            } else if method == "POST" && path == "/app/installations/77/access_tokens" {
                let mut s = self.lock();
                let app = s.app.as_mut().unwrap();
                let token = format!("inst-{}", app.issued.len() + 1);
                let life = app.token_life;
                app.issued.push((token.clone(), Instant::now() + life));
                let expires = hive_types::time::iso(
                    hive_sys::now_ms() + i64::try_from(life.as_millis()).unwrap(),
                    'T',
                );
                (201, json!({"token": token, "expires_at": expires}))
            } else {
                (404, json!({"message": "Not Found"}))
            };
            self.record(method, path, headers, Value::Null, Answer::Created);
            return respond(conn, code, &reply.to_string(), "").await;
        }
        let mut answer = self.lock().default.unwrap_or(Answer::Created);
        // With an App, a status call needs a live installation token.
        let mut refused = false;
        if is_status {
            if let Some(app) = &self.lock().app {
                let live = app
                    .issued
                    .iter()
                    .any(|(t, until)| *t == bearer && Instant::now() < *until);
                refused = !live;
            }
        }
        if refused {
            answer = Answer::Fail500;
        }
        let json_body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let headers_seen = headers.clone();
        self.record(method, path, headers, json_body, answer);
        if refused {
            return respond(conn, 401, r#"{"message":"Bad credentials"}"#, "").await;
        }
        match answer {
            Answer::Created => respond(conn, 201, r#"{"id":1}"#, "").await,
            Answer::Fail500 => respond(conn, 500, r#"{"message":"down"}"#, "").await,
            Answer::Close => Ok(()),
            Answer::Stall => {
                // Until the client hangs up (or a minute).
                let mut b = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(60), conn.read(&mut b)).await;
                Ok(())
            }
            Answer::Redirect => {
                // To the fake itself: a client that followed would be seen here.
                let to = format!("Location: http://{}/elsewhere\r\n", self.addr);
                respond(conn, 302, "", &to).await
            }
            Answer::Echo => {
                let seen = format!("{headers_seen:?}");
                respond(conn, 422, &seen, "").await
            }
            Answer::Huge => {
                conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n")
                    .await?;
                let chunk = vec![b'x'; 1 << 20];
                for _ in 0..100 {
                    conn.write_all(&chunk).await?;
                }
                Ok(())
            }
        }
    }

    fn record(
        &self,
        method: String,
        path: String,
        headers: Vec<(String, String)>,
        body: Value,
        answer: Answer,
    ) {
        self.lock().calls.push(Call {
            method,
            path,
            headers,
            body,
            answer,
        });
    }

    /// A JWT signed by the App's key, for its id, not expired.
    fn jwt_ok(&self, jwt: &str) -> bool {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut s = self.lock();
        let Some(app) = &s.app else { return false };
        let parts: Vec<&str> = jwt.split('.').collect();
        if parts.len() != 3 {
            return false;
        }
        let Ok(sig) = b64.decode(parts[2]) else {
            return false;
        };
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            &app.public_der,
        );
        let signed = format!("{}.{}", parts[0], parts[1]);
        if key.verify(signed.as_bytes(), &sig).is_err() {
            return false;
        }
        let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
        let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        let now = hive_sys::now_ms() / 1000;
        let ok = header["alg"] == "RS256"
            && claims["iss"].as_str().and_then(|s| s.parse::<u64>().ok()) == Some(app.id)
            && claims["exp"]
                .as_i64()
                .is_some_and(|e| e > now && e <= now + 600)
            && claims["iat"].as_i64().is_some_and(|i| i <= now);
        if ok {
            s.jwt_seen += 1;
        }
        ok
    }
}

async fn read_request<S: AsyncRead + Unpin>(
    conn: &mut S,
) -> Option<(String, String, Vec<(String, String)>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((method, path, headers, body))
}

async fn respond<S: AsyncWrite + Unpin>(
    conn: &mut S,
    code: u16,
    body: &str,
    extra: &str,
) -> std::io::Result<()> {
    let text = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    conn.write_all(text.as_bytes()).await?;
    conn.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// The control plane and its builds.

/// A control plane whose statuses link to [`PUBLIC`] and retry fast.
async fn control_plane(
    url: &str,
    tweak: impl FnOnce(&mut hive_control_plane::server::Config),
) -> Handle {
    start_with(url, |c| {
        c.public_url = Some(PUBLIC.to_string());
        c.forge.poll = Duration::from_millis(100);
        c.forge.backoff = Duration::from_millis(100);
        c.forge.backoff_cap = Duration::from_millis(400);
        c.forge.timeout = Duration::from_secs(2);
        tweak(c);
    })
    .await
}

async fn project(api: &mut Api, name: &str, repo: &str) {
    api.create_project(CreateProjectRequest {
        name: name.into(),
        repo_url: repo.into(),
        secret: SECRET.into(),
        steps: vec!["make".into()],
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn set_forge(
    api: &mut Api,
    project: &str,
    forge: &str,
    api_url: &str,
    token: &str,
) -> ForgeStatusReply {
    api.forge_status(ForgeStatusRequest {
        project: project.into(),
        forge: forge.into(),
        api_url: api_url.into(),
        token: token.into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("set forge of {project}: {e}"))
    .into_inner()
}

fn sha(n: u32) -> String {
    format!("{n:040x}")
}

#[derive(Debug, Clone, Copy)]
enum End {
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

/// A box that heartbeats on its own (reporting its running builds), so its session and
/// leases live as long as a test needs.
async fn live_box(handle: &Handle) -> FakeBox {
    FakeBox::connect(
        &format!("http://{}", handle.grpc_addr),
        FakeBoxConfig::new("box-a", "small", 1, 8),
    )
    .await
    .expect("box registers")
}

/// Submits a build of `rev` and drives it through `bx` to `end`; returns its id.
async fn drive(api: &mut Api, bx: &mut FakeBox, project: &str, rev: &str, end: End) -> String {
    let id = api
        .submit_build(SubmitBuildRequest {
            project: project.into(),
            revision: rev.into(),
            git_ref: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    run(api, bx, &id, end).await;
    id
}

/// Drives build `id` (about to be assigned to `bx`) to `end`.
async fn run(api: &mut Api, bx: &mut FakeBox, id: &str, end: End) {
    let a = bx.next_assignment(WAIT).await.unwrap();
    assert_eq!(a.build_id, id);
    bx.accept(&a, "cell-1", true).await;
    bx.running(&a).await;
    bx.wait_all_acked(WAIT).await.unwrap();
    wait_state(api, id, BuildState::Running).await;
    match end {
        End::Succeeded => {
            bx.finish(&a, BuildState::Succeeded, 0).await;
        }
        End::Failed => {
            bx.finish(&a, BuildState::Failed, 2).await;
        }
        End::TimedOut => {
            bx.finish(&a, BuildState::TimedOut, -1).await;
        }
        End::Cancelled => {
            api.cancel_build(CancelBuildRequest {
                id: id.into(),
                reason: "stop".into(),
            })
            .await
            .unwrap();
            bx.expect_cancel(id, WAIT).await.unwrap();
            bx.finish(&a, BuildState::Cancelled, -1).await;
        }
    }
    bx.wait_all_acked(WAIT).await.unwrap();
}

async fn wait_state(api: &mut Api, id: &str, state: BuildState) {
    let t0 = Instant::now();
    loop {
        let b = api
            .get_build(GetBuildRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if b.state == state as i32 {
            return;
        }
        assert!(t0.elapsed() < WAIT, "build {id} never got to {state:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn states(got: &[(String, String)]) -> Vec<&str> {
    got.iter().map(|(s, _)| s.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

/// The exact statuses of a succeeded, failed, cancelled and timed-out build on GitHub, and of
/// builds on GitLab and Gitea, with each forge's URL, auth header, context and link.
async fn statuses_follow_builds(url: String) {
    let (gh, gl, gt) = (
        Fake::start().await,
        Fake::start().await,
        Fake::start().await,
    );
    let handle = control_plane(&url, |_| {}).await;
    let mut api = api(&handle).await;
    project(&mut api, "app", "https://github.com/acme/app.git").await;
    project(&mut api, "lab", "https://gitlab.example/grp/sub/lab.git").await;
    project(&mut api, "tea", "https://gitea.example/acme/tea.git").await;
    let r = set_forge(&mut api, "app", "github", &gh.base(""), "ghp_secret_1").await;
    assert_eq!(
        (r.forge.as_str(), r.repository.as_str(), r.auth.as_str()),
        ("github", "acme/app", "token")
    );
    set_forge(
        &mut api,
        "lab",
        "gitlab",
        &gl.base("/api/v4"),
        "glpat-secret-2",
    )
    .await;
    set_forge(
        &mut api,
        "tea",
        "forgejo",
        &gt.base("/api/v1/"),
        "gitea-secret-3",
    )
    .await;
    let mut bx = live_box(&handle).await;

    // A push through the webhook (on PostgreSQL: the group commit's one statement), then API
    // submissions.
    let push = json!({
        "ref": "refs/heads/main",
        "after": sha(1),
        "repository": {"clone_url": "https://github.com/acme/app.git"},
    });
    let r = push_signed(
        handle.http_addr,
        SECRET.as_bytes(),
        "d-1",
        push.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let ok_id = r.json()["build_id"].as_str().unwrap().to_string();
    run(&mut api, &mut bx, &ok_id, End::Succeeded).await;
    drive(&mut api, &mut bx, "app", &sha(2), End::Failed).await;
    let cancelled = drive(&mut api, &mut bx, "app", &sha(3), End::Cancelled).await;
    drive(&mut api, &mut bx, "app", &sha(4), End::TimedOut).await;
    drive(&mut api, &mut bx, "lab", &sha(5), End::Succeeded).await;
    drive(&mut api, &mut bx, "lab", &sha(6), End::Cancelled).await;
    drive(&mut api, &mut bx, "lab", &sha(7), End::TimedOut).await;
    drive(&mut api, &mut bx, "tea", &sha(8), End::Failed).await;

    let pending_running = |end: (&str, &str)| {
        vec![
            ("pending".to_string(), "queued".to_string()),
            ("pending".to_string(), "running".to_string()),
            (end.0.to_string(), end.1.to_string()),
        ]
    };
    assert_eq!(
        gh.wait_accepted(&sha(1), 3).await,
        pending_running(("success", "succeeded"))
    );
    let failed = gh.wait_accepted(&sha(2), 3).await;
    assert_eq!(states(&failed), ["pending", "pending", "failure"]);
    assert!(failed[2].1.starts_with("failed: "), "{failed:?}");
    let c = gh.wait_accepted(&sha(3), 3).await;
    assert_eq!(states(&c), ["pending", "pending", "error"]);
    assert!(c[2].1.starts_with("cancelled"), "{c:?}");
    let t = gh.wait_accepted(&sha(4), 3).await;
    assert_eq!(states(&t), ["pending", "pending", "error"]);
    assert!(t[2].1.starts_with("timed out"), "{t:?}");
    assert_eq!(
        states(&gl.wait_accepted(&sha(5), 3).await),
        ["pending", "running", "success"]
    );
    let c = gl.wait_accepted(&sha(6), 3).await;
    assert_eq!(states(&c), ["pending", "running", "canceled"]);
    let t = gl.wait_accepted(&sha(7), 3).await;
    assert_eq!(states(&t), ["pending", "running", "failed"]);
    assert!(t[2].1.starts_with("timed out"), "{t:?}");
    assert_eq!(
        states(&gt.wait_accepted(&sha(8), 3).await),
        ["pending", "pending", "failure"]
    );

    // Each forge's URL, credentials, context and link.
    let call = gh
        .status_calls()
        .into_iter()
        .find(|c| c.path.ends_with(&sha(3)))
        .unwrap();
    assert_eq!(call.method, "POST");
    assert_eq!(call.path, format!("/repos/acme/app/statuses/{}", sha(3)));
    assert_eq!(call.header("authorization"), Some("Bearer ghp_secret_1"));
    assert_eq!(call.body["context"], "hive/app");
    assert_eq!(
        call.body["target_url"],
        format!("{PUBLIC}/ui/builds/{cancelled}")
    );
    // Statuses of different commits go out in any order (each commit's in its own order).
    let call = &gl
        .status_calls()
        .into_iter()
        .find(|c| c.path.ends_with(&sha(5)))
        .unwrap();
    assert_eq!(
        call.path,
        format!("/api/v4/projects/grp%2Fsub%2Flab/statuses/{}", sha(5))
    );
    assert_eq!(call.header("private-token"), Some("glpat-secret-2"));
    assert_eq!(call.body["name"], "hive/lab");
    let call = &gt
        .status_calls()
        .into_iter()
        .find(|c| c.path.ends_with(&sha(8)))
        .unwrap();
    assert_eq!(
        call.path,
        format!("/api/v1/repos/acme/tea/statuses/{}", sha(8))
    );
    assert_eq!(call.header("authorization"), Some("token gitea-secret-3"));
    assert_eq!(call.body["context"], "hive/tea");
    // Nothing was sent twice, and nothing waits.
    assert_eq!(gh.status_calls().len(), 12);
    assert_eq!(gl.status_calls().len(), 9);
    assert_eq!(gt.status_calls().len(), 3);
    // The counters and the outbox as one scrape sees them (the last write may land between
    // its two reads: looked at until both agree).
    let t0 = Instant::now();
    loop {
        let metrics = common::http(handle.http_addr, "GET", "/metrics", &[], b"")
            .await
            .body;
        if metrics.contains("hive_forge_statuses_total{outcome=\"sent\"} 24")
            && metrics.contains("hive_forge_statuses_pending 0")
        {
            assert!(metrics.contains("hive_forge_statuses_total{outcome=\"failed\"} 0"));
            break;
        }
        assert!(t0.elapsed() < WAIT, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Statuses off: builds go on, the forge hears nothing more.
    api.forge_status(ForgeStatusRequest {
        project: "tea".into(),
        off: true,
        ..Default::default()
    })
    .await
    .unwrap();
    drive(&mut api, &mut bx, "tea", &sha(9), End::Succeeded).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(gt.accepted(&sha(9)).is_empty());
    handle.shutdown().await;
}

/// A forge that answers 500, then closes connections, then recovers: every status arrives, in
/// order, once; builds meanwhile are placed and end as fast as without the outage.
async fn an_outage_is_retried_in_order(url: String) {
    let gh = Fake::start().await;
    let handle = control_plane(&url, |_| {}).await;
    let mut api = api(&handle).await;
    project(&mut api, "app", "https://github.com/acme/app.git").await;
    set_forge(&mut api, "app", "github", &gh.base(""), "tok").await;
    let mut bx = live_box(&handle).await;
    gh.set_default(Answer::Fail500);
    let t0 = Instant::now();
    for n in 1..=3 {
        drive(&mut api, &mut bx, "app", &sha(n), End::Succeeded).await;
    }
    let during = t0.elapsed();
    assert!(
        during < Duration::from_secs(5),
        "three builds took {during:?} while the forge was down"
    );
    // Down for a while: 500s, then closed connections.
    tokio::time::sleep(Duration::from_millis(600)).await;
    gh.set_default(Answer::Close);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let failed_calls = gh.status_calls().len();
    assert!(failed_calls >= 3, "retries: {failed_calls}");
    assert!(gh
        .status_calls()
        .iter()
        .all(|c| c.answer != Answer::Created));
    gh.set_default(Answer::Created);
    for n in 1..=3 {
        assert_eq!(
            gh.wait_accepted(&sha(n), 3).await,
            vec![
                ("pending".to_string(), "queued".to_string()),
                ("pending".to_string(), "running".to_string()),
                ("success".to_string(), "succeeded".to_string()),
            ]
        );
    }
    // Per commit, the calls (failed ones too) never went backwards: once the success was
    // tried, nothing before it was sent again.
    for n in 1..=3 {
        let calls: Vec<String> = gh
            .status_calls()
            .into_iter()
            .filter(|c| c.path.ends_with(&sha(n)))
            .map(|c| c.body["description"].as_str().unwrap().to_string())
            .collect();
        let rank = |d: &str| {
            ["queued", "running", "succeeded"]
                .iter()
                .position(|x| *x == d)
                .unwrap()
        };
        assert!(
            calls.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])),
            "{calls:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gh.status_calls()
            .iter()
            .filter(|c| c.answer == Answer::Created)
            .count(),
        9,
        "each status accepted once"
    );
    let metrics = common::http(handle.http_addr, "GET", "/metrics", &[], b"")
        .await
        .body;
    assert!(
        metrics.contains("hive_forge_statuses_total{outcome=\"sent\"} 9"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("hive_forge_statuses_total{outcome=\"retried\"} 0"),
        "{metrics}"
    );
    handle.shutdown().await;
}

/// A GitHub App: the key signs a JWT, the fake checks it and hands out installation tokens
/// that expire quickly; later statuses use a new one.
async fn github_app_tokens_are_refreshed(url: String) {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("app.pem");
    let out = std::process::Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&key_path)
        .arg("2048")
        .output()
        .expect("openssl (Debian's openssl package) makes the test's App key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read_to_string(&key_path).unwrap();
    assert!(pem.contains("BEGIN RSA PRIVATE KEY"), "GitHub's format");
    let key = hive_control_plane::forge::app::AppKey::from_pem(&pem).unwrap();
    let gh = Fake::start().await;
    gh.lock().app = Some(App {
        id: 4242,
        public_der: key.public_der(),
        // Renewed when less than a minute is left: usable for about two seconds.
        token_life: hive_control_plane::forge::app::REFRESH_MARGIN + Duration::from_secs(2),
        issued: Vec::new(),
    });
    let handle = control_plane(&url, |_| {}).await;
    let mut api = api(&handle).await;
    project(&mut api, "app", "https://github.com/acme/app.git").await;
    let r = api
        .forge_status(ForgeStatusRequest {
            project: "app".into(),
            forge: "github".into(),
            api_url: gh.base(""),
            app_id: 4242,
            app_key_pem: pem.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.auth.as_str(), r.app_id), ("github-app", 4242));
    assert!(!format!("{r:?}").contains("PRIVATE"));
    let mut bx = live_box(&handle).await;
    drive(&mut api, &mut bx, "app", &sha(1), End::Succeeded).await;
    assert_eq!(
        states(&gh.wait_accepted(&sha(1), 3).await),
        ["pending", "pending", "success"]
    );
    let first = gh.status_calls()[0]
        .header("authorization")
        .unwrap()
        .to_string();
    assert_eq!(first, "Bearer inst-1");
    tokio::time::sleep(Duration::from_secs(3)).await;
    drive(&mut api, &mut bx, "app", &sha(2), End::Failed).await;
    assert_eq!(
        states(&gh.wait_accepted(&sha(2), 3).await),
        ["pending", "pending", "failure"]
    );
    let later: Vec<String> = gh
        .status_calls()
        .into_iter()
        .filter(|c| c.path.ends_with(&sha(2)))
        .map(|c| c.header("authorization").unwrap().to_string())
        .collect();
    assert!(later.iter().all(|t| *t != first), "refreshed: {later:?}");
    let issued = gh.lock().app.as_ref().unwrap().issued.len();
    assert!(issued >= 2, "installation tokens made: {issued}");
    assert!(
        gh.lock().jwt_seen >= 4,
        "each token: installation lookup + token, with a JWT"
    );
    // No status was refused for an expired token.
    assert!(gh
        .status_calls()
        .iter()
        .all(|c| c.answer == Answer::Created));

    // A key the app does not have: the forge refuses the JWT, the status is given up with
    // the forge's reason.
    let other = dir.path().join("other.pem");
    assert!(std::process::Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&other)
        .arg("2048")
        .output()
        .unwrap()
        .status
        .success());
    api.forge_status(ForgeStatusRequest {
        project: "app".into(),
        forge: "github".into(),
        api_url: gh.base(""),
        app_id: 4242,
        app_key_pem: std::fs::read_to_string(&other).unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    drive(&mut api, &mut bx, "app", &sha(3), End::Succeeded).await;
    let t0 = Instant::now();
    loop {
        let r = api
            .forge_status(ForgeStatusRequest {
                project: "app".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if r.last_error.contains("401") {
            break;
        }
        assert!(t0.elapsed() < WAIT, "no error shown: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gh.accepted(&sha(3)).is_empty());
    handle.shutdown().await;
}

/// Forges that stall, answer 100 MiB or redirect hold neither the sender nor the control
/// plane: a good forge's statuses still arrive at once, at most `concurrency` calls are open,
/// the API answers, and each hostile status ends retried or given up, saying why.
async fn hostile_forges_stall_nothing(url: String) {
    let (good, slow, huge, moved, echo) = (
        Fake::start().await,
        Fake::start().await,
        Fake::start().await,
        Fake::start().await,
        Fake::start().await,
    );
    echo.set_default(Answer::Echo);
    slow.set_default(Answer::Stall);
    huge.set_default(Answer::Huge);
    moved.set_default(Answer::Redirect);
    let handle = control_plane(&url, |c| {
        c.forge.timeout = Duration::from_millis(700);
        c.forge.concurrency = 3;
        c.forge.max_attempts = 3;
    })
    .await;
    let mut api = api(&handle).await;
    for (name, fake) in [
        ("good", &good),
        ("slow", &slow),
        ("huge", &huge),
        ("moved", &moved),
    ] {
        project(
            &mut api,
            name,
            &format!("https://github.com/acme/{name}.git"),
        )
        .await;
        set_forge(&mut api, name, "github", &fake.base(""), "tok").await;
    }
    project(&mut api, "echo", "https://gitea.example/acme/echo.git").await;
    let mut bx = live_box(&handle).await;
    let t0 = Instant::now();
    // Several commits on the stalling forge: each one's head status would take a slot.
    for n in 10..15 {
        drive(&mut api, &mut bx, "slow", &sha(n), End::Succeeded).await;
    }
    drive(&mut api, &mut bx, "huge", &sha(20), End::Succeeded).await;
    drive(&mut api, &mut bx, "moved", &sha(30), End::Succeeded).await;
    set_forge(&mut api, "echo", "gitea", &echo.base(""), "tok-echo-secret").await;
    drive(&mut api, &mut bx, "echo", &sha(50), End::Succeeded).await;
    drive(&mut api, &mut bx, "good", &sha(40), End::Succeeded).await;
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "builds took {:?}",
        t0.elapsed()
    );
    // The good forge is served although every slot may be waiting on a hostile one: a slot
    // frees within the timeout.
    let got = good.wait_accepted(&sha(40), 3).await;
    assert_eq!(states(&got), ["pending", "pending", "success"]);
    // The API and the health check answer at once meanwhile.
    let t1 = Instant::now();
    api.get_build(GetBuildRequest { id: "nope".into() })
        .await
        .unwrap_err();
    let h = common::http(handle.http_addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(h.status, 200);
    assert!(t1.elapsed() < Duration::from_secs(1));
    // The redirect is not followed, and given up at once with the reason.
    let t0 = Instant::now();
    loop {
        let r = api
            .forge_status(ForgeStatusRequest {
                project: "moved".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if r.last_error.contains("redirect") {
            assert!(r.last_error.contains("not followed"), "{}", r.last_error);
            break;
        }
        assert!(t0.elapsed() < WAIT, "redirect not reported: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        moved
            .status_calls()
            .iter()
            .all(|c| !c.path.contains("elsewhere")),
        "nothing followed the redirect"
    );
    // A forge that echoes the token back: the refusal is kept, the token is not.
    let t0 = Instant::now();
    loop {
        let r = api
            .forge_status(ForgeStatusRequest {
                project: "echo".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if r.last_error.contains("422") {
            assert!(
                !r.last_error.contains("tok-echo-secret"),
                "{}",
                r.last_error
            );
            assert!(r.last_error.contains("token ***"), "{}", r.last_error);
            break;
        }
        assert!(t0.elapsed() < WAIT, "echo not reported: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The huge answer is cut, not read: the status is retried, then given up.
    let t0 = Instant::now();
    loop {
        let r = api
            .forge_status(ForgeStatusRequest {
                project: "huge".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if r.last_error.contains("over 65536 bytes") {
            break;
        }
        assert!(t0.elapsed() < WAIT, "huge body not reported: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Never more calls open at once than the concurrency allows (the fakes count theirs).
    // One forge gets at most a quarter of the slots (here 1 of 3), so the others go on.
    let open = slow.lock().max_in_flight;
    assert_eq!(open, 1, "calls open at once to the stalling forge");
    // The stalling forge's call ended at the timeout, and says so.
    let t0 = Instant::now();
    loop {
        let r = api
            .forge_status(ForgeStatusRequest {
                project: "slow".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if r.last_error.contains("no answer within 700ms") {
            assert!(r.pending > 0, "{r:?}");
            break;
        }
        assert!(t0.elapsed() < WAIT, "timeout not reported: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.shutdown().await;
}

/// Two control planes on one PostgreSQL drain one outbox: each status is sent once, in order
/// per commit.
async fn two_control_planes_send_each_status_once(url: String) {
    let gh = Fake::start().await;
    let a = control_plane(&url, |_| {}).await;
    let token = a.admin_token().unwrap().to_string();
    let b = control_plane(&url, |_| {}).await;
    let mut api_a = api_as(&a, &token).await;
    let mut api_b = api_as(&b, &token).await;
    project(&mut api_a, "app", "https://github.com/acme/app.git").await;
    set_forge(&mut api_a, "app", "github", &gh.base(""), "tok").await;
    // Queued builds (no box): one `pending` each, through either control plane.
    for n in 1..=30u32 {
        let api = if n % 2 == 0 { &mut api_a } else { &mut api_b };
        api.submit_build(SubmitBuildRequest {
            project: "app".into(),
            revision: sha(n),
            git_ref: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for n in 1..=30 {
        gh.wait_accepted(&sha(n), 1).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = gh.status_calls();
    assert_eq!(calls.len(), 30, "each status sent once by one of the two");
    a.shutdown().await;
    b.shutdown().await;
}

/// A GitHub Enterprise over https behind a private CA (`--forge-ca-file`): the statuses go
/// over TLS to the fake, which only a client trusting that CA can reach.
async fn https_forge_behind_a_private_ca(url: String) {
    let dir = tempfile::tempdir().unwrap();
    let ca = hive_control_plane::pki::Ca::load_or_create(dir.path()).unwrap();
    let (chain, key) = ca
        .server_identity(&["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap();
    let ca_file = dir.path().join("forge-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let ghe = Fake::start_tls(&chain, &key).await;
    let handle = control_plane(&url, |c| c.forge.ca_file = Some(ca_file.clone())).await;
    let mut api = api(&handle).await;
    project(&mut api, "ent", "https://ghe.corp/acme/ent.git").await;
    let api_url = format!("https://127.0.0.1:{}/api/v3", ghe.addr.port());
    set_forge(&mut api, "ent", "github", &api_url, "ghe-token").await;
    let mut bx = live_box(&handle).await;
    drive(&mut api, &mut bx, "ent", &sha(60), End::Succeeded).await;
    let got = ghe.wait_accepted(&sha(60), 3).await;
    assert_eq!(states(&got), ["pending", "pending", "success"]);
    let call = &ghe.status_calls()[0];
    assert_eq!(
        call.path,
        format!("/api/v3/repos/acme/ent/statuses/{}", sha(60))
    );
    assert_eq!(call.header("authorization"), Some("Bearer ghe-token"));
    handle.shutdown().await;
}

async fn refused(api: &mut Api, req: ForgeStatusRequest, needle: &str) {
    let e = api.forge_status(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains(needle), "{needle}: {}", e.message());
}

/// The settings' checks: API URLs that are not http(s), tokens that would break a header, an
/// App for a forge that has none, a key that is not one; and no reply carries a credential.
async fn forge_settings_are_checked_and_never_returned(url: String) {
    let handle = control_plane(&url, |_| {}).await;
    let mut api = api(&handle).await;
    project(&mut api, "app", "https://github.com/acme/app.git").await;
    let base = ForgeStatusRequest {
        project: "app".into(),
        forge: "github".into(),
        token: "tok".into(),
        ..Default::default()
    };
    for (api_url, needle) in [
        ("file:///etc/passwd", "not an http(s) URL"),
        ("gopher://x/", "not an http(s) URL"),
        ("https://user:pw@api.github.com", "carries credentials"),
        ("https://api.github.com/?x=1", "not an http(s) URL"),
    ] {
        refused(
            &mut api,
            ForgeStatusRequest {
                api_url: api_url.into(),
                ..base.clone()
            },
            needle,
        )
        .await;
    }
    refused(
        &mut api,
        ForgeStatusRequest {
            token: "tok\r\nX-Evil: 1".into(),
            ..base.clone()
        },
        "printable ASCII",
    )
    .await;
    refused(
        &mut api,
        ForgeStatusRequest {
            forge: "bitbucket".into(),
            ..base.clone()
        },
        "not one Hive reports to",
    )
    .await;
    refused(
        &mut api,
        ForgeStatusRequest {
            forge: "gitlab".into(),
            token: String::new(),
            app_id: 1,
            app_key_pem: "x".into(),
            ..base.clone()
        },
        "an App is GitHub's",
    )
    .await;
    refused(
        &mut api,
        ForgeStatusRequest {
            token: String::new(),
            app_id: 1,
            app_key_pem: "not a key".into(),
            ..base.clone()
        },
        "not an RSA private key",
    )
    .await;
    refused(
        &mut api,
        ForgeStatusRequest {
            token: String::new(),
            ..base.clone()
        },
        "no credentials",
    )
    .await;
    // Set, then shown: the default API from the repository's host; no token anywhere.
    let r = api
        .forge_status(ForgeStatusRequest {
            token: "ghp_very_secret".into(),
            ..base.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.api_url, "https://api.github.com");
    let shown = api
        .forge_status(ForgeStatusRequest {
            project: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.forge, "github");
    for text in [format!("{r:?}"), format!("{shown:?}")] {
        assert!(!text.contains("ghp_very_secret"), "{text}");
    }
    // A viewer may not set or read credentials settings.
    let viewer = api
        .create_token(hive_proto::v1::CreateTokenRequest {
            name: "v".into(),
            role: "read-only".into(),
            project: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let e = api_as(&handle, &viewer)
        .await
        .forge_status(base.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // Deleting the project takes its credentials along.
    api.delete_project(hive_proto::v1::DeleteProjectRequest {
        project: "app".into(),
    })
    .await
    .unwrap();
    project(&mut api, "app", "https://github.com/acme/app.git").await;
    let again = api
        .forge_status(ForgeStatusRequest {
            project: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.forge, "",
        "a new project of the same name has no forge"
    );
    handle.shutdown().await;
}

hive_testkit::on_both!(db =>
    statuses_follow_builds,
    an_outage_is_retried_in_order,
    github_app_tokens_are_refreshed,
    hostile_forges_stall_nothing,
    forge_settings_are_checked_and_never_returned,
    https_forge_behind_a_private_ca,
);

/// One control plane per SQLite file: this one is PostgreSQL's alone (skipped, loudly, without
/// `HIVE_TEST_POSTGRES_URL`; a failure under `CI=true`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_send_each_status_once_postgres() {
    let Some(db) = hive_testkit::TestDb::postgres("two_control_planes_send_each_status_once").await
    else {
        return;
    };
    two_control_planes_send_each_status_once(db.url.clone()).await;
    db.drop_db().await;
}
