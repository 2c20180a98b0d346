//! The dashboard in a real headless Chromium (Debian's `chromium`, driven over the DevTools
//! protocol by `headless_chrome`) against a real control plane on SQLite: sign in, a build
//! submitted through the gRPC API appears in the list without a reload, its page follows its
//! state and log lines live, and cancelling it shows the change; the pages fit a phone's width
//! and turn dark when the system asks for it. The box is the test kit's
//! `FakeBox` (a real BoxAgent session, driven step by step), not a sandbox box.
//!
//! Screenshots of the list, the build page and the fleet go to
//! `$CARGO_TARGET_TMPDIR/ui-screens/`. Without Chromium the test prints SKIPPED and passes,
//! unless `CI=true`, where it fails (`deploy/install-deps.sh` installs it).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use headless_chrome::protocol::cdp::Emulation;
use headless_chrome::types::Bounds;
use headless_chrome::Tab;
use hive_proto::v1::{self as pb, BuildState, LogStream};
use hive_testkit::browser::{chromium_or_skip, js, launch, screenshot, sign_in, text};
use hive_testkit::fakebox::{FakeBox, FakeBoxConfig};

const T: Duration = Duration::from_secs(20);

#[test]
fn browser_signs_in_and_follows_a_build_live() {
    let Some(chrome) = chromium_or_skip("browser_signs_in_and_follows_a_build_live") else {
        return;
    };
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = hive_testkit::TestDb::sqlite();
    let handle = rt.block_on(common::start(&db.url));
    let base = format!("http://{}", handle.http_addr);
    let token = handle.admin_token().unwrap().to_string();
    let mut admin = rt.block_on(common::api(&handle));
    rt.block_on(admin.create_project(pb::CreateProjectRequest {
        name: "webapp".into(),
        repo_url: "https://git.example/acme/webapp".into(),
        steps: vec!["make".into(), "make test".into()],
        ..Default::default()
    }))
    .expect("project");
    let mut fb = rt
        .block_on(FakeBox::connect(
            &format!("http://{}", handle.grpc_addr),
            FakeBoxConfig::new("box-browser", "small", 1, 2),
        ))
        .expect("fake box");
    let screens = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screens");
    std::fs::create_dir_all(&screens).unwrap();

    let browser = launch(chrome, (1280, 900), Duration::from_secs(180));
    let lap = |what: &str| eprintln!("[{:>6.2?}] {what}", t0.elapsed());
    lap("chromium started");
    let tab = browser.new_tab().expect("tab");
    tab.set_default_timeout(T);

    // Not signed in: the sign-in page.
    tab.navigate_to(&format!("{base}/ui/builds"))
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    assert!(tab.get_url().contains("/ui/signin"), "{}", tab.get_url());
    sign_in(&tab, &token);
    tab.wait_for_element("#builds").expect("the builds list");
    // The cookie is HttpOnly: the page's script cannot read it.
    assert_eq!(js(&tab, "document.cookie"), serde_json::json!(""));
    tab.wait_for_element("#live.on")
        .expect("the list's stream opens");
    lap("signed in, the list live");

    // A build submitted now appears without a reload (the marker would be gone after one).
    js(&tab, "window.hiveMarker = 42");
    let id = rt
        .block_on(admin.submit_build(pb::SubmitBuildRequest {
            project: "webapp".into(),
            git_ref: "refs/heads/main".into(),
            revision: "89abcdef0123456789abcdef0123456789abcdef".into(),
            ..Default::default()
        }))
        .expect("submit")
        .into_inner()
        .id;
    tab.wait_for_element(&format!("#b-{id}"))
        .expect("the new build's row, live");
    assert_eq!(js(&tab, "window.hiveMarker"), serde_json::json!(42));
    let a = rt.block_on(fb.next_assignment(T)).expect("assignment");
    assert_eq!(a.build_id, id);
    rt.block_on(fb.accept(&a, "cell-1", true));
    tab.wait_for_element(&format!("#b-{id} .s-placed, #b-{id} .s-running"))
        .expect("the row follows the state");
    lap("new build's row appeared and follows its state");
    screenshot(&tab, &screens, "builds.png");

    // Open it; its page follows the state and the log.
    tab.wait_for_element(&format!("#b-{id} a.mono"))
        .unwrap()
        .click()
        .unwrap();
    tab.wait_until_navigated().unwrap();
    tab.wait_for_element("#log").expect("the build page");
    tab.wait_for_element("#live.on")
        .expect("the build's stream opens");
    lap("build page open, following");
    js(&tab, "window.hiveMarker = 7");
    rt.block_on(fb.running(&a));
    tab.wait_for_element("#summary .s-running")
        .expect("running, live");
    rt.block_on(fb.log(
        &a,
        LogStream::Stdout,
        0,
        b"$ make\n\x1b[1;32mcompiling\x1b[0m hive <script>alert(1)</script>\n",
    ));
    tab.wait_for_element("#L2").expect("log lines, live");
    assert!(text(&tab, "#L2").contains("compiling hive <script>alert(1)</script>"));
    assert_eq!(
        js(&tab, "document.querySelectorAll('#log script').length"),
        serde_json::json!(0)
    );
    assert_eq!(
        js(&tab, "document.querySelector('#L2 .f2.b').textContent"),
        serde_json::json!("compiling")
    );
    for i in 0..5 {
        rt.block_on(fb.log(
            &a,
            LogStream::Stderr,
            1,
            format!("test {i} \x1b[31mok\x1b[0m\n").as_bytes(),
        ));
    }
    tab.wait_for_element("#L7").expect("more lines, live");
    // Step 1 ("make") links to where its output starts, filled in live.
    assert_eq!(
        js(
            &tab,
            "document.querySelector('#step-1 a.steplink').getAttribute('href')"
        ),
        serde_json::json!("#L3")
    );
    // The running build's duration counts on in the page between updates.
    let deadline = Instant::now() + T;
    loop {
        let d = js(
            &tab,
            "document.querySelector('#summary dd.duration').textContent",
        );
        let secs = d
            .as_str()
            .and_then(|d| d.strip_suffix('s'))
            .and_then(|d| d.parse::<u64>().ok());
        if secs.is_some_and(|s| s >= 2) {
            break;
        }
        assert!(Instant::now() < deadline, "duration stuck at {d}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(js(&tab, "window.hiveMarker"), serde_json::json!(7));
    lap("state and log lines arrived live");
    screenshot(&tab, &screens, "build.png");

    // Cancel from the page: the box is told, and the page shows the build cancelled.
    tab.wait_for_element("form[action$='/cancel'] button")
        .unwrap()
        .click()
        .unwrap();
    tab.wait_until_navigated().unwrap();
    tab.wait_for_element("#summary .s-cancelled")
        .expect("cancelled");
    rt.block_on(fb.expect_cancel(&id, T))
        .expect("the box is told");
    let state = rt
        .block_on(admin.get_build(pb::GetBuildRequest { id: id.clone() }))
        .unwrap()
        .into_inner()
        .state;
    assert_eq!(state, BuildState::Cancelled as i32);
    // The log rendered from the store this time, the same lines.
    assert!(text(&tab, "#L2").contains("compiling hive"));

    lap("cancelled from the page");
    // The fleet.
    tab.navigate_to(&format!("{base}/ui/boxes"))
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    assert!(text(&tab, "main table").contains("box-browser"));
    assert!(text(&tab, "main table").contains("ready"));
    screenshot(&tab, &screens, "fleet.png");

    // Phone width: nothing makes the page itself scroll sideways (wide tables scroll in
    // their own box).
    tab.set_bounds(Bounds::Normal {
        left: None,
        top: None,
        width: Some(390.0),
        height: Some(844.0),
    })
    .expect("phone-sized window");
    for path in [
        "/ui/builds".to_string(),
        "/ui/boxes".into(),
        format!("/ui/builds/{id}"),
    ] {
        tab.navigate_to(&format!("{base}{path}"))
            .unwrap()
            .wait_until_navigated()
            .unwrap();
        tab.wait_for_element("main").unwrap();
        let fits = js(
            &tab,
            "document.documentElement.scrollWidth <= window.innerWidth + 1 && window.innerWidth < 500",
        );
        assert_eq!(fits, serde_json::json!(true), "{path} at phone width");
    }
    screenshot(&tab, &screens, "build-phone.png");

    // Dark theme when the system asks for it: the page's background turns dark.
    let background = |tab: &Tab| {
        js(tab, "getComputedStyle(document.body).backgroundColor")
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(background(&tab), "rgb(255, 255, 255)");
    tab.call_method(Emulation::SetEmulatedMedia {
        media: None,
        features: Some(vec![Emulation::MediaFeature {
            name: "prefers-color-scheme".into(),
            value: "dark".into(),
        }]),
    })
    .expect("emulate a dark system theme");
    assert_eq!(background(&tab), "rgb(17, 20, 24)");
    screenshot(&tab, &screens, "build-phone-dark.png");

    drop(tab);
    drop(browser);
    rt.block_on(handle.shutdown());
    rt.block_on(db.drop_db());
    eprintln!(
        "browser test passed in {:?}; screenshots in {}",
        t0.elapsed(),
        screens.display()
    );
}
