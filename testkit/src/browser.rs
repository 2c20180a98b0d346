//! A headless Chromium for the dashboard's browser tests (`control-plane/tests/ui_browser.rs`,
//! `tests/tests/e2e_dashboard.rs`), driven over the DevTools protocol by `headless_chrome`.
//!
//! Debian's `chromium` (or `HIVE_CHROMIUM=/path`); without it a test says SKIPPED and passes,
//! unless `CI=true`, where it fails.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};

/// `HIVE_CHROMIUM`, else the first Chromium or Chrome found in `/usr/bin`.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HIVE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// [`chromium`] for `test`; without one, prints SKIPPED and gives `None`, or under `CI=true`
/// panics (`deploy/install-deps.sh` installs it).
pub fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    let found = chromium();
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("no chromium, and CI=true: deploy/install-deps.sh installs Debian's chromium");
        }
        eprintln!("SKIPPED: {test}: no chromium (apt-get install chromium, or set HIVE_CHROMIUM)");
    }
    found
}

/// Starts `chrome` headless with a `width` x `height` window, closed after `idle` without a
/// command. Without Chromium's sandbox: tests run as root, where it cannot start.
pub fn launch(chrome: PathBuf, (width, height): (u32, u32), idle: Duration) -> Browser {
    Browser::new(LaunchOptions {
        path: Some(chrome),
        headless: true,
        sandbox: false,
        window_size: Some((width, height)),
        idle_browser_timeout: idle,
        args: vec![OsStr::new("--disable-dev-shm-usage")],
        ..Default::default()
    })
    .expect("launch chromium")
}

/// On the sign-in page: pastes `token` (as a person would; typing it key by key takes seconds),
/// signs in and waits for the page it leads to.
pub fn sign_in(tab: &Tab, token: &str) {
    tab.wait_for_element("#token")
        .expect("the sign-in form")
        .click()
        .expect("click the token field");
    tab.send_character(token).expect("paste the token");
    tab.wait_for_element("form.signin button")
        .expect("the sign-in button")
        .click()
        .expect("click sign in");
    tab.wait_until_navigated().expect("signed in");
}

/// Saves the page as `dir/name` (PNG) and says where.
pub fn screenshot(tab: &Tab, dir: &Path, name: &str) {
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot");
    let path = dir.join(name);
    std::fs::write(&path, png).expect("write screenshot");
    eprintln!("screenshot: {}", path.display());
}

/// The inner text of the first element matching `selector`, once there.
pub fn text(tab: &Tab, selector: &str) -> String {
    tab.wait_for_element(selector)
        .unwrap_or_else(|e| panic!("{selector}: {e}"))
        .get_inner_text()
        .unwrap_or_default()
}

/// The value of the JavaScript expression `expr` in the page (`null` for none).
pub fn js(tab: &Tab, expr: &str) -> serde_json::Value {
    tab.evaluate(expr, false)
        .unwrap_or_else(|e| panic!("evaluate {expr}: {e}"))
        .value
        .unwrap_or(serde_json::Value::Null)
}
