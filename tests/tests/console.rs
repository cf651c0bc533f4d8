//! The web console end to end: a real coordinator (`serve --http-listen`, with client, worker and
//! viewer tokens) and a real worker, driven by headless Chromium through chromedriver. A sweep
//! submitted with the CLI appears on the sweeps page; while it runs, a trial's epoch count and
//! curve grow on the open page without a reload; when it ends, the cross-validation table shows
//! every fold and marks the winner; charts and figures render; a wrong token is refused and the
//! viewer cannot cancel; a sweep named `<script>alert(1)</script>` runs nothing; any JavaScript
//! error fails the test; a WGAN-GP's page shows its four curves, sample grids and figures; the
//! workers page shows each worker's device and time by phase. With
//! `COHORT_CONSOLE_SCREENSHOTS=DIR` each page's screenshot is saved.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cohort_cluster_tests::webdriver::{http, Browser};
use cohort_cluster_tests::{free_address, mnist_sample, small_wgan_sweep, temp_dir, Cluster};
use serde_json::{json, Value};

const VIEWER_TOKEN: &str = "viewer-token-for-tests";
const CLIENT_TOKEN: &str = "client-token-for-tests";
const XSS_NAME: &str = "<script>alert(1)</script>";

fn sweep_text(name: &str, epochs: u32) -> String {
    format!(
        r#"
name = "{name}"
[dataset]
format = "idx"
path = "{}"
train_limit = 4000
test_limit = 200
[noise]
std = 0.3
[model]
kind = "dae"
latent = 4
[cv]
folds = 2
epochs = {epochs}
batch_size = 32
[cv.grid]
lr = [1e-3, 3e-3]
[final]
epochs = 2
"#,
        mnist_sample().replace('\\', "/")
    )
}

/// A script that is true once at least `at_least` of the images `selector` matches whose alt
/// text or address contains `named` are there, and every image it matches has loaded.
fn images_loaded(selector: &str, named: &str, at_least: usize) -> String {
    format!(
        "const imgs = [...document.querySelectorAll('{selector}')]; \
         return imgs.filter(i => (i.alt + i.src).includes('{named}')).length >= {at_least} && imgs.every(i => i.complete && i.naturalWidth > 0)"
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn api(address: SocketAddr, path: &str) -> Value {
    let answer = http(address, "GET", path, &[("Authorization", &bearer(CLIENT_TOKEN))], None);
    assert_eq!(answer.status, 200, "GET {path}: {}", answer.text());
    answer.json()
}

/// Saves a screenshot when `COHORT_CONSOLE_SCREENSHOTS` names a folder.
fn screenshot(browser: &Browser, name: &str) {
    let Some(folder) = std::env::var_os("COHORT_CONSOLE_SCREENSHOTS") else { return };
    let folder = PathBuf::from(folder);
    let folder = if folder.is_relative() { cohort_cluster_tests::repo_root().join(folder) } else { folder };
    std::fs::create_dir_all(&folder).expect("screenshot folder");
    browser.screenshot(&folder.join(format!("{name}.png")));
}

/// Fails on any browser console error that is not a refused request the test asked for
/// (a wrong sign-in answers 401, a viewer's cancel 403: the browser logs those as network errors).
fn assert_no_script_errors(browser: &Browser, page: &str) {
    let severe: Vec<Value> =
        browser.console_log().into_iter().filter(|entry| entry["level"] == "SEVERE" && entry["source"] != "network").collect();
    assert!(severe.is_empty(), "JavaScript errors on the {page} page: {severe:#?}");
    let banner = browser.execute("return document.getElementById('errors').textContent", json!([]));
    assert_eq!(banner, json!(""), "the {page} page reported an error");
    assert!(browser.alert_text().is_none(), "an alert opened on the {page} page");
}

fn sign_in(browser: &Browser, token: &str) {
    browser.wait_until("the sign-in form", Duration::from_secs(30), "return document.getElementById('token') !== null");
    browser.type_into("#token", token);
    browser.click("#login button[type=submit]");
}

fn sign_out(browser: &Browser) {
    browser.click("#logout");
    browser.wait_until("the sign-in form after signing out", Duration::from_secs(30), "return document.getElementById('token') !== null");
}

#[test]
fn the_console_follows_a_sweep_live_in_a_real_browser() {
    let dir = temp_dir();
    let viewer_file = dir.path().join("viewer.token");
    std::fs::write(&viewer_file, format!("{VIEWER_TOKEN}\n")).unwrap();
    let console = free_address();
    let (console_arg, viewer_arg) = (console.to_string(), viewer_file.to_string_lossy().into_owned());
    let mut cluster = Cluster::start_in(dir, &["--http-listen", &console_arg, "--viewer-token-file", &viewer_arg]);
    let base = format!("http://{console}");

    // The API and the gRPC service by token, before any browser.
    assert_eq!(http(console, "GET", "/api/sweeps", &[], None).status, 401);
    assert_eq!(http(console, "GET", "/api/sweeps", &[("Authorization", &bearer("wrong"))], None).status, 401);
    assert_eq!(http(console, "GET", "/api/sweeps", &[("Authorization", &bearer("worker-token-for-tests"))], None).status, 403);
    assert_eq!(http(console, "GET", "/api/sweeps", &[("Authorization", &bearer(VIEWER_TOKEN))], None).status, 200);
    let page = http(console, "GET", "/", &[], None);
    let csp = page.header("content-security-policy").expect("a CSP header").to_string();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert!(http(console, "GET", "/metrics", &[], None).text().contains("cohort_"), "the console's listener serves /metrics");

    let live = cluster.submit("live.toml", &sweep_text("console-live", 6));
    // Long enough to be still running when the client cancels it at the end.
    let xss = cluster.submit("xss.toml", &sweep_text(XSS_NAME, 300));
    let viewer_status = cluster.client_with_token(&viewer_file, &["status"]);
    assert!(viewer_status.status.success(), "the viewer token lists sweeps: {}", String::from_utf8_lossy(&viewer_status.stderr));
    let viewer_cancel = cluster.client_with_token(&viewer_file, &["cancel", &xss]);
    assert!(!viewer_cancel.status.success());
    assert!(String::from_utf8_lossy(&viewer_cancel.stderr).contains("viewer token"), "{}", String::from_utf8_lossy(&viewer_cancel.stderr));
    let refused = http(console, "POST", &format!("/api/sweeps/{xss}/cancel"), &[("Authorization", &bearer(VIEWER_TOKEN))], Some(""));
    assert_eq!(refused.status, 403, "{}", refused.text());

    let browser = Browser::start();
    browser.goto(&base);
    // (5) A wrong token is refused.
    sign_in(&browser, "not-the-token");
    browser.wait_until("the refusal", Duration::from_secs(30), "return document.getElementById('login-error').textContent");
    screenshot(&browser, "sign-in");
    // (1) The sweep submitted with the CLI appears on the sweeps page (as the viewer).
    sign_in(&browser, VIEWER_TOKEN);
    let row = format!("document.querySelector('tr[data-sweep=\"{live}\"] .sweep-name')");
    browser.wait_until("the live sweep on the sweeps page", Duration::from_secs(30), &format!("return {row} && {row}.textContent"));
    // (6) The <script> sweep's name is shown as text and runs nothing.
    let xss_text = browser.wait_until(
        "the <script> sweep on the sweeps page",
        Duration::from_secs(30),
        &format!("const a = document.querySelector('tr[data-sweep=\"{xss}\"] .sweep-name'); return a && a.textContent"),
    );
    assert_eq!(xss_text, json!(XSS_NAME));
    assert_eq!(browser.execute("return document.querySelectorAll('main script').length", json!([])), json!(0));
    assert_no_script_errors(&browser, "sweeps");

    // (5) The viewer cannot cancel: the button is disabled and the API refuses.
    browser.goto(&format!("{base}/#/sweep/{xss}"));
    browser.wait_until(
        "the <script> sweep's page",
        Duration::from_secs(30),
        "const h = document.getElementById('sweep-name'); return h && h.textContent",
    );
    assert_eq!(browser.execute("return document.getElementById('sweep-name').textContent", json!([])), json!(XSS_NAME));
    assert_eq!(browser.execute("return document.getElementById('cancel').disabled", json!([])), json!(true));
    let status = browser.command(
        "POST",
        "/execute/async",
        json!({"script": format!("const done = arguments[0]; fetch('/api/sweeps/{xss}/cancel', {{method: 'POST'}}).then(r => done(r.status));"), "args": []}),
    );
    assert_eq!(status, json!(403), "a viewer session's cancel is refused");
    assert_no_script_errors(&browser, "sweep (viewer)");

    // (2) The open sweep page follows a running trial: its epochs and curve grow without a reload.
    browser.goto(&format!("{base}/#/sweep/{live}"));
    browser.wait_until("the live sweep's page", Duration::from_secs(30), "return document.querySelector('#trials-body tr') !== null");
    browser.execute("window.__sameDocument = 'yes'; return true", json!([]));
    cluster.add_worker("w0");
    let epochs_of_selected = "const t = document.getElementById('trial-name'); const row = t && [...document.querySelectorAll('#trials-body tr')].find(r => r.classList.contains('selected')); \
                              const cell = row && row.querySelector('.epochs'); return cell ? parseInt(cell.textContent, 10) : 0";
    let points =
        "const p = document.querySelector('#trial-charts path.series'); return p ? parseInt(p.getAttribute('data-points'), 10) : 0";
    let first =
        browser.wait_until("a first epoch on the page", Duration::from_secs(120), &format!("{{ {epochs_of_selected} }}")).as_i64().unwrap();
    let first_points = browser.wait_until("a first point on the trial's chart", Duration::from_secs(30), points).as_i64().unwrap();
    let grew_at = Instant::now();
    let later = browser
        .wait_until(
            "the epoch count to grow",
            Duration::from_secs(120),
            &format!("const n = (() => {{ {epochs_of_selected} }})(); return n > {first} ? n : 0"),
        )
        .as_i64()
        .unwrap();
    browser.wait_until(
        "the chart to grow",
        Duration::from_secs(30),
        &format!("const n = (() => {{ {points} }})(); return n > {first_points} ? n : 0"),
    );
    eprintln!(
        "epochs on the page went from {first} to {later} ({:.1} s), chart points from {first_points}",
        grew_at.elapsed().as_secs_f64()
    );
    assert_eq!(browser.execute("return window.__sameDocument || null", json!([])), json!("yes"), "the page reloaded");
    screenshot(&browser, "sweep-running");
    assert_no_script_errors(&browser, "sweep (running)");

    // (3) When the sweep ends, the CV table shows every fold and marks the winner.
    let started = Instant::now();
    loop {
        let sweep = api(console, &format!("/api/sweeps/{live}"));
        let final_stage_done =
            sweep["stages"].as_array().is_some_and(|s| s.iter().any(|st| st["stage"] == "final" && st["ended"] == st["total"]));
        if sweep["state"] != "running" && final_stage_done {
            assert_eq!(sweep["state"], "succeeded", "{sweep}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "the sweep did not end: {sweep}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let cv = api(console, &format!("/api/sweeps/{live}/cv"));
    let winner =
        cv["configs"].as_array().unwrap().iter().find(|c| c["winner"] == true).expect("a winner")["config"].as_str().unwrap().to_string();
    browser.wait_until(
        "every fold's value and the winner in the CV table",
        Duration::from_secs(20),
        "const rows = [...document.querySelectorAll('#cv-table tbody tr')]; \
         return rows.length === 2 && rows.every(r => [...r.querySelectorAll('td.fold')].length === 2 && [...r.querySelectorAll('td.fold')].every(c => /\\d/.test(c.textContent))) \
                && document.querySelectorAll('#cv-table tr.winner').length === 1",
    );
    let marked = browser.execute("return document.querySelector('#cv-table tr.winner').dataset.config", json!([]));
    assert_eq!(marked, json!(winner));
    let explanation = browser.execute("return document.getElementById('cv-explanation').textContent", json!([]));
    assert!(explanation.as_str().unwrap().contains("lowest mean"), "{explanation}");

    // (4) Charts have data; the report's figures load and decode.
    browser.wait_until(
        "the config chart's curves and bands",
        Duration::from_secs(20),
        "return document.querySelectorAll('#cv path.series').length === 2 && document.querySelectorAll('#cv path.band').length === 2",
    );
    browser.wait_until("the figures to load and decode", Duration::from_secs(60), &images_loaded("#figures img", "", 3));
    let decoded = browser.command(
        "POST",
        "/execute/async",
        json!({"script": "const done = arguments[0]; Promise.all([...document.querySelectorAll('#figures img')].map(i => i.decode().then(() => true, () => false))).then(r => done(r.every(x => x)));", "args": []}),
    );
    assert_eq!(decoded, json!(true), "every figure decodes");
    browser.execute("window.scrollTo(0, 0); return true", json!([]));
    screenshot(&browser, "sweep-finished");
    assert_no_script_errors(&browser, "sweep (finished)");

    // The final trial's page: its artifacts render as images and its checkpoint downloads.
    browser.execute("document.getElementById('trial-stage').value = 'final'; document.getElementById('trial-stage').dispatchEvent(new Event('change')); return true", json!([]));
    browser.wait_until(
        "the final trial's row",
        Duration::from_secs(30),
        "return document.querySelectorAll('#trials-body tr').length === 1",
    );
    browser.click("#trials-body tr");
    browser.wait_until("the final trial's artifact images", Duration::from_secs(30), &images_loaded("#trial-artifacts img", "", 1));
    let link = browser.wait_until(
        "a checkpoint link",
        Duration::from_secs(30),
        "const a = document.querySelector('#trial-checkpoints a'); return a && a.getAttribute('href')",
    );
    let download = http(console, "GET", link.as_str().unwrap(), &[("Authorization", &bearer(VIEWER_TOKEN))], None);
    assert_eq!(download.status, 200);
    assert!(download.body.len() > 1000, "a checkpoint has bytes");
    browser.wait_until("the trial's log", Duration::from_secs(30), "return document.getElementById('trial-log').textContent.length > 0");
    browser.execute("document.getElementById('trial').scrollIntoView(); return true", json!([]));
    screenshot(&browser, "trial");

    // The workers page: name, device, current trial, time by phase, last seen.
    browser.goto(&format!("{base}/#/workers"));
    browser.wait_until(
        "the worker on the workers page",
        Duration::from_secs(30),
        "return [...document.querySelectorAll('#workers-body td')].some(td => td.textContent === 'w0')",
    );
    let device = browser.execute("return document.querySelector('#workers-body td.device').textContent", json!([]));
    assert_eq!(device, json!("cpu"));
    browser.wait_until(
        "the worker's time by phase",
        Duration::from_secs(20),
        "const td = document.querySelector('#workers-body td.phases'); return td && /train \\d+%/.test(td.textContent) && td.textContent",
    );
    screenshot(&browser, "workers");
    assert_no_script_errors(&browser, "workers");

    // The client token may act: cancel the <script> sweep from its page (CSRF token and all).
    sign_out(&browser);
    sign_in(&browser, CLIENT_TOKEN);
    browser.goto(&format!("{base}/#/sweep/{xss}"));
    browser.wait_until(
        "an enabled cancel button",
        Duration::from_secs(30),
        "const b = document.getElementById('cancel'); return b && !b.disabled",
    );
    browser.click("#cancel");
    browser.wait_until(
        "the cancellation",
        Duration::from_secs(20),
        "return /cancelled/.test(document.getElementById('action-message').textContent)",
    );
    browser.goto(&format!("{base}/#/"));
    browser.wait_until("the sweeps page", Duration::from_secs(30), &format!("return {row} && {row}.textContent"));
    screenshot(&browser, "sweeps");
    assert_no_script_errors(&browser, "sweeps (client)");
    let xss_state = api(console, &format!("/api/sweeps/{xss}"))["state"].clone();
    assert_eq!(xss_state, json!("cancelled"));

    // With the worker free again, a WGAN-GP's page: its critic, generator, Wasserstein and
    // penalty curves, its sample grids by epoch, and the report's figures 4-7.
    let gan = cluster.submit("gan.toml", &small_wgan_sweep("console-gan"));
    browser.goto(&format!("{base}/#/sweep/{gan}"));
    browser.wait_until("the WGAN-GP sweep's page", Duration::from_secs(30), "return document.querySelector('#trials-body tr') !== null");
    browser.click("#trials-body tr");
    assert_eq!(cluster.client_ok(&["wait", &gan, "--timeout", "300"]).trim(), "succeeded");
    // Points of each curve: the four WGAN-GP curves (critic, generator, Wasserstein, penalty)
    // with both epochs, within 30 s.
    let curves = "return [...document.querySelectorAll('#trial-charts path.series')].map(p => p.getAttribute('data-points')).join(' ')";
    let started = Instant::now();
    loop {
        let drawn = browser.execute(curves, json!([]));
        let points: Vec<&str> = drawn.as_str().unwrap_or_default().split_whitespace().collect();
        if points.iter().filter(|p| **p == "2").count() >= 4 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the WGAN-GP trial's curves (points each): {drawn}");
        std::thread::sleep(Duration::from_millis(250));
    }
    browser.wait_until("the sample grids of each epoch", Duration::from_secs(60), &images_loaded("#trial-artifacts img", "samples-e", 2));
    browser.wait_until("figures 4-7 to load", Duration::from_secs(60), &images_loaded("#figures img", "", 4));
    browser.execute("window.scrollTo(0, 0); return true", json!([]));
    screenshot(&browser, "sweep-wgan");
    assert_no_script_errors(&browser, "sweep (WGAN-GP)");

    // The browser kept its profile, dconf and crash folders in a home of its own, not the user's.
    assert!(browser.home().join(".config/chromium").is_dir(), "the browser wrote nothing into its own home");
    drop(browser);
    cluster.kill("w0");
}
