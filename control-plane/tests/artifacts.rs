//! Issue 14's artefact store, on SQLite and PostgreSQL: a box streams a build's artefacts over
//! the real BoxAgent session (`ArtifactChunk`), the control plane writes them under
//! `<data-dir>/artifacts/<build>/` with rows, ListArtifacts/GetArtifact read them back, and
//! retention removes them with the build. A hostile box tries to write outside the build's
//! directory (`..`, absolute paths, odd components), to pass the size and the cap, to leave
//! holes, to change a file's size, and to write artefacts of another box's build or lease:
//! every one is refused (and acked, so it is not sent forever), and nothing lands outside.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{api, eventually, fake_box, http, pool, start_with};
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::{
    ArtifactChunk, Assignment, BuildState, CreateProjectRequest, GetArtifactRequest,
    ListArtifactsRequest, SubmitBuildRequest,
};
use tokio_stream::StreamExt;

const WAIT: Duration = Duration::from_secs(15);
const CAP: u64 = 64 * 1024;

fn chunk(a: &Assignment, path: &str, size: u64, offset: u64, data: &[u8]) -> BoxMsg {
    BoxMsg::Artifact(ArtifactChunk {
        build_id: a.build_id.clone(),
        lease_id: a.lease_id.clone(),
        path: path.into(),
        size,
        offset,
        data: data.to_vec(),
    })
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

async fn get(client: &mut common::Api, build: &str, path: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut s = client
        .get_artifact(GetArtifactRequest {
            build_id: build.into(),
            path: path.into(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(p) = s.next().await {
        let p = p?;
        assert_eq!(p.offset, out.len() as u64);
        out.extend(p.data);
    }
    Ok(out)
}

async fn artifacts_are_stored_read_and_purged_and_hostile_boxes_refused(db: String) {
    let mut data_dir = PathBuf::new();
    let handle = start_with(&db, |c| {
        c.artifact_cap = CAP;
        data_dir = c.data_dir.clone();
    })
    .await;
    let store = data_dir.join("artifacts");
    let _ = std::fs::remove_dir_all(&store);
    let token = handle.admin_token().expect("admin token").to_string();
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "arts".into(),
            repo_url: "git://198.18.0.2/arts.git".into(),
            secret: "s".into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let submit = |n: &str| SubmitBuildRequest {
        project: "arts".into(),
        revision: format!("abc12{n}"),
        git_ref: String::new(),
        ..Default::default()
    };
    let (mut a_box, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 1)]).await;
    client.submit_build(submit("3")).await.unwrap();
    let a = a_box
        .next_assignment(WAIT)
        .await
        .expect("assignment for box-a");
    assert_eq!(
        a.artifact_cap_bytes, CAP,
        "the cap travels with the assignment"
    );
    a_box.accept(&a, "cell-a", true).await;
    a_box.running(&a).await;
    let (mut b_box, _) = fake_box(&handle, "box-b", vec![pool("small", 1, 1)]).await;
    client.submit_build(submit("4")).await.unwrap();
    let b = b_box
        .next_assignment(WAIT)
        .await
        .expect("assignment for box-b");
    b_box.accept(&b, "cell-b", true).await;
    b_box.running(&b).await;

    // A well-behaved box: a file in two pieces (the first sent twice, as after a reconnect),
    // an empty file, one at the cap's edge, one left incomplete.
    for m in [
        chunk(&a, "out/app", 10, 0, b"hello"),
        chunk(&a, "out/app", 10, 0, b"hello"),
        chunk(&a, "out/app", 10, 5, b"world"),
        chunk(&a, "empty", 0, 0, b""),
        chunk(&a, "big/blob", 50_000, 0, &[7u8; 50_000]),
        chunk(&a, "partial", 10, 0, b"half"),
    ] {
        a_box.send_acked(m).await;
    }
    // A hostile one: out of the directory, past sizes and the cap, holes, another's build.
    let mut other_lease = a.clone();
    other_lease.lease_id = "lease-that-is-not-live".into();
    let mut b_as_a = b.clone();
    b_as_a.lease_id = a.lease_id.clone();
    for m in [
        chunk(&a, "../../escape", 1, 0, b"x"),
        chunk(&a, "../artifacts-escape", 1, 0, b"x"),
        chunk(&a, "/tmp/hive-artifact-escape", 1, 0, b"x"),
        chunk(&a, "a/./b", 1, 0, b"x"),
        chunk(&a, "a//b", 1, 0, b"x"),
        chunk(&a, "a\\..\\..\\b", 1, 0, b"x"),
        chunk(&a, "", 1, 0, b"x"),
        chunk(&a, &"d/".repeat(40), 1, 0, b"x"),
        chunk(&a, "huge", 1 << 50, 0, b"x"),
        chunk(&a, "over-cap", 20_000, 0, b"x"),
        chunk(&a, "out/app", 10, 3, b"0123456789"),
        chunk(&a, "out/app", 11, 0, b"hello"),
        chunk(&a, "partial", 10, 8, b"zz"),
        chunk(&a, "out/app/inside-a-file", 1, 0, b"x"),
        chunk(&other_lease, "stale", 1, 0, b"x"),
        chunk(&b, "stolen", 1, 0, b"x"),
        chunk(&b_as_a, "stolen", 1, 0, b"x"),
    ] {
        a_box.send_acked(m).await;
    }
    // A bad build id never becomes a directory name either.
    let mut bad_id = a.clone();
    bad_id.build_id = "../../x".into();
    a_box.send_acked(chunk(&bad_id, "f", 1, 0, b"x")).await;
    a_box.wait_all_acked(WAIT).await.expect("every chunk acked");
    // box-b's own artefact of its own build is fine.
    b_box.send_acked(chunk(&b, "mine", 3, 0, b"bbb")).await;
    b_box.wait_all_acked(WAIT).await.expect("box-b acked");
    a_box.finish(&a, BuildState::Succeeded, 0).await;
    a_box.wait_all_acked(WAIT).await.unwrap();
    // Chunks after the build ended are not taken.
    a_box.send_acked(chunk(&a, "late", 1, 0, b"x")).await;
    a_box.wait_all_acked(WAIT).await.unwrap();

    let list = client
        .list_artifacts(ListArtifactsRequest {
            build_id: a.build_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .artifacts;
    let seen: Vec<(&str, u64, u64, bool)> = list
        .iter()
        .map(|x| (x.path.as_str(), x.size, x.stored_bytes, x.complete))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("big/blob", 50_000, 50_000, true),
            ("empty", 0, 0, true),
            ("out/app", 10, 10, true),
            ("partial", 10, 4, false),
        ]
    );
    assert_eq!(
        list[2].sha256,
        "936a185caaa266bb9cbe981e9e05cb78cd732b0b3280eb944412bb6f8f8f07af"
    );
    assert_eq!(
        get(&mut client, &a.build_id, "out/app").await.unwrap(),
        b"helloworld"
    );
    assert_eq!(get(&mut client, &a.build_id, "empty").await.unwrap(), b"");
    assert_eq!(
        get(&mut client, &a.build_id, "big/blob").await.unwrap(),
        vec![7u8; 50_000]
    );
    let e = get(&mut client, &a.build_id, "partial").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let e = get(&mut client, &a.build_id, "../../hive.db")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = get(&mut client, &a.build_id, "nothing").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let e = get(&mut client, "no-such-build", "x").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // Over HTTP, signed in like the dashboard: a session cookie, or a redirect to sign in.
    let page = format!("/ui/builds/{}/artifacts/out/app", a.build_id);
    let r = http(handle.http_addr, "GET", &page, &[], b"").await;
    assert_eq!(r.status, 303, "{r:?}");
    assert!(
        r.header("location").unwrap().starts_with("/ui/signin"),
        "{r:?}"
    );
    let form = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([("token", token.as_str()), ("next", "/ui/builds")])
        .finish();
    let r = http(
        handle.http_addr,
        "POST",
        "/ui/signin",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    )
    .await;
    let cookie = r
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    let r = http(
        handle.http_addr,
        "GET",
        &page,
        &[("Cookie", cookie.as_str())],
        b"",
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "helloworld"), "{r:?}");
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"app\"")
    );
    // The build's page links the complete ones, escaped like every path a box sends.
    let r = http(
        handle.http_addr,
        "GET",
        &format!("/ui/builds/{}", a.build_id),
        &[("Cookie", cookie.as_str())],
        b"",
    )
    .await;
    assert!(r.body.contains(&format!("href=\"{page}\"")), "{}", r.body);
    assert!(r.body.contains("incomplete: 4 of 10 bytes"), "{}", r.body);
    for (path, status) in [
        ("out/%2e%2e/%2e%2e/hive.db", 400),
        ("partial", 409),
        ("nothing", 404),
    ] {
        let r = http(
            handle.http_addr,
            "GET",
            &format!("/ui/builds/{}/artifacts/{path}", a.build_id),
            &[("Cookie", cookie.as_str())],
            b"",
        )
        .await;
        assert_eq!(r.status, status, "{path}: {r:?}");
    }

    // On disk: exactly the build's files in its own directory, box-b's in its, nothing else.
    let mut want = vec![
        format!("{}/big/blob", a.build_id),
        format!("{}/empty", a.build_id),
        format!("{}/out/app", a.build_id),
        format!("{}/partial", a.build_id),
        format!("{}/mine", b.build_id),
    ];
    want.sort();
    assert_eq!(files_under(&store), want);
    for p in ["escape", "artifacts-escape", "x"] {
        assert!(!data_dir.join(p).exists(), "{p} written outside");
    }
    assert!(!Path::new("/tmp/hive-artifact-escape").exists());
    let metrics = http(handle.http_addr, "GET", "/metrics", &[], b"").await;
    assert!(
        metrics
            .body
            .contains("hive_box_violations_total{kind=\"artifact\"} 19\n"),
        "{}",
        metrics
            .body
            .lines()
            .filter(|l| l.contains("violations"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Retention: the ended build goes with its artefacts; the running one keeps its own.
    handle.shutdown().await;
    let handle = start_with(&db, |c| {
        c.artifact_cap = CAP;
        c.retention = Some(Duration::from_millis(1));
    })
    .await;
    let a_dir = store.join(&a.build_id);
    eventually(
        WAIT,
        "retention removes the ended build's artefacts",
        || {
            let gone = !a_dir.exists();
            async move { gone }
        },
    )
    .await;
    assert!(store.join(&b.build_id).join("mine").exists());
    let mut client = common::api_as(&handle, &token).await;
    let e = client
        .list_artifacts(ListArtifactsRequest {
            build_id: a.build_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    handle.shutdown().await;
}

hive_testkit::on_both!(db => artifacts_are_stored_read_and_purged_and_hostile_boxes_refused);
