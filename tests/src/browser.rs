//! Browser tests of the web console (`batchctl ui`): a headless Chromium driven over WebDriver
//! (chromedriver, through `fantoccini`), the console of a [`TestEnv`], and a bare HTTP client
//! for what a browser cannot show (status codes of refused requests).
//!
//! Chromium and chromedriver are Debian's `chromium` and `chromium-driver` (`/usr/bin/…`;
//! `BATCHQ_CHROMIUM` and `BATCHQ_CHROMEDRIVER` name others). Where they are missing a test
//! skips, saying so, unless `BATCHQ_TEST_REQUIRE_BROWSER` is set (`.ci/run` sets it).

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::prometheus::free_port;
use crate::{Bin, ProcId, TestEnv};

/// Pause between two looks at a condition.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long chromedriver, Chromium and the console may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The window the pages (and the screenshots) are rendered in.
const WINDOW_SIZE: (u32, u32) = (1280, 900);
/// What `batchctl ui` prints as its first stdout line, before the URL.
const CONSOLE_BANNER: &str = "batchq console: ";

// ---------------------------------------------------------------------------------------------
// Waiting

/// Polls `check` until it gives `Some`, for at most `timeout`. An error of `check` is only a
/// reason to look again (a page being replaced, an element refreshed away); the last one is
/// in the failure, which names `what` was awaited.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!("{what}: not within {timeout:?}; last error: {e:#}"),
                None => bail!("{what}: not within {timeout:?}"),
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Chromium and chromedriver

fn program(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

fn chromium_path() -> PathBuf {
    program("BATCHQ_CHROMIUM", "/usr/bin/chromium")
}

fn chromedriver_path() -> PathBuf {
    program("BATCHQ_CHROMEDRIVER", "/usr/bin/chromedriver")
}

/// Whether test `test` must be skipped for want of a browser: `true` (said on stderr) when
/// Chromium or chromedriver is missing and `BATCHQ_TEST_REQUIRE_BROWSER` is unset; an error
/// when one is missing and the run requires them.
pub fn skip_without_browser(test: &str) -> Result<bool> {
    let missing: Vec<String> = [chromium_path(), chromedriver_path()]
        .into_iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let required = std::env::var("BATCHQ_TEST_REQUIRE_BROWSER")
        .is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0");
    ensure!(
        !required,
        "{} not found, and BATCHQ_TEST_REQUIRE_BROWSER is set (apt-get install chromium \
         chromium-driver)",
        missing.join(" and ")
    );
    eprintln!(
        "SKIPPED: test {test}: {} not found; the browser tests need Debian's chromium and \
         chromium-driver (or BATCHQ_CHROMIUM and BATCHQ_CHROMEDRIVER). \
         BATCHQ_TEST_REQUIRE_BROWSER=1 fails instead.",
        missing.join(" and ")
    );
    Ok(true)
}

/// A chromedriver child in a process group of its own, which holds the Chromium it starts:
/// dropping it kills the whole group, so a failed test leaves no browser behind.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    async fn start(log: &Path) -> Result<Self> {
        let port = free_port()?;
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(chromedriver_path())
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .context("starting chromedriver")?;
        let driver = Self { child, port };
        wait_until(START_TIMEOUT, "chromedriver answering", || async {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(drop))
        })
        .await
        .with_context(|| format!("chromedriver's log: {}", crate::tail(log, 20)))?;
        Ok(driver)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // `unsafe_code` is forbidden, so no `libc::killpg`: the `kill` utility signals the
        // group (chromedriver's pid is its group's id).
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text and `data-*` attributes of one element, read in one go by a script (so a table
/// refreshed by the page's own JavaScript between two reads cannot mix two versions of it).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub text: String,
    /// `data-job="x"` is `"job" → "x"` (the `dataset` names: `data-ops-total` → `opsTotal`).
    pub data: BTreeMap<String, String>,
    /// `href` of a link, `value` of an input, `action` of a form (absent ones are not listed).
    pub attrs: BTreeMap<String, String>,
}

impl Node {
    /// A `data-*` attribute (by its `dataset` name); an error naming it when absent.
    pub fn data(&self, name: &str) -> Result<&str> {
        self.data
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("no data-{name} on {self:?}"))
    }

    /// A `data-*` attribute as a number.
    pub fn number(&self, name: &str) -> Result<u64> {
        let text = self.data(name)?;
        text.trim()
            .parse()
            .with_context(|| format!("data-{name}={text:?} is not a count"))
    }
}

/// A headless Chromium of a test's own (its own chromedriver and a fresh profile), closed and
/// killed with its chromedriver when dropped.
pub struct Browser {
    client: Client,
    /// Where [`Browser::screenshot`] writes when `BATCHQ_UI_SCREENSHOTS` is unset.
    screenshot_dir: PathBuf,
    // Dropped after the client: the profile folder outlives the browser using it.
    driver: Chromedriver,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium for `env`'s test; chromedriver's log is
    /// `chromedriver.log` in the test's folder, as are the screenshots unless
    /// `BATCHQ_UI_SCREENSHOTS` names another folder.
    pub async fn start(env: &TestEnv) -> Result<Self> {
        let driver = Chromedriver::start(&env.dir().join("chromedriver.log")).await?;
        let profile = tempfile::Builder::new()
            .prefix("batchq-chromium-")
            .tempdir()
            .context("creating Chromium's profile folder")?;
        let (width, height) = WINDOW_SIZE;
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
            format!("--window-size={width},{height}"),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium_path().display().to_string(), "args": args}),
        );
        let client = tokio::time::timeout(
            START_TIMEOUT,
            ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities)
                .connect(&driver.url()),
        )
        .await
        .context("starting Chromium through chromedriver timed out")?
        .context("starting Chromium through chromedriver")?;
        Ok(Self {
            client,
            screenshot_dir: env.dir().to_path_buf(),
            driver,
            _profile: profile,
        })
    }

    /// The WebDriver client, for what the helpers here do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("opening {url}"))
    }

    /// The path and query of the page shown: `/jobs/x?fpage=2`.
    pub async fn location(&self) -> Result<String> {
        let url = self.client.current_url().await?;
        Ok(match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        })
    }

    /// Every element matching `css`, in document order.
    pub async fn nodes(&self, css: &str) -> Result<Vec<Node>> {
        let script = "return Array.from(document.querySelectorAll(arguments[0])).map(e => ({\
                          text: e.textContent,\
                          data: Object.assign({}, e.dataset),\
                          attrs: Object.fromEntries(['href', 'value', 'action', 'name']\
                              .filter(a => e.hasAttribute(a)).map(a => [a, e.getAttribute(a)])),\
                      }));";
        let found = self
            .client
            .execute(script, vec![json!(css)])
            .await
            .with_context(|| format!("querying {css}"))?;
        let Value::Array(found) = found else {
            bail!("querying {css}: not a list: {found}");
        };
        let strings = |v: &Value| -> BTreeMap<String, String> {
            v.as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(found
            .iter()
            .map(|node| Node {
                text: node["text"].as_str().unwrap_or_default().to_owned(),
                data: strings(&node["data"]),
                attrs: strings(&node["attrs"]),
            })
            .collect())
    }

    /// The one element matching `css`, if any (an error when several match).
    pub async fn node(&self, css: &str) -> Result<Option<Node>> {
        let mut nodes = self.nodes(css).await?;
        ensure!(nodes.len() <= 1, "{} elements match {css}", nodes.len());
        Ok(nodes.pop())
    }

    /// The text of the one element matching `css`, trimmed; an error when there is none.
    pub async fn text(&self, css: &str) -> Result<String> {
        match self.node(css).await? {
            Some(node) => Ok(node.text.trim().to_owned()),
            None => bail!("no {css} on {}", self.describe().await),
        }
    }

    /// `outcome`, with the page shown added to an error (what the test waited for in vain
    /// is usually explained by what the page says instead).
    pub async fn explain<T>(&self, outcome: Result<T>) -> Result<T> {
        match outcome {
            Ok(value) => Ok(value),
            Err(e) => Err(e.context(self.describe().await)),
        }
    }

    /// [`wait_until`] for a condition of the page: a failure says what the page shows.
    pub async fn until<T, F, Fut>(&self, timeout: Duration, what: &str, check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let outcome = wait_until(timeout, what, check).await;
        self.explain(outcome).await
    }

    /// Waits until the one element matching `css` is on the page.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Result<Node> {
        let outcome = wait_until(timeout, &format!("{css} on the page"), || self.node(css)).await;
        self.explain(outcome).await
    }

    /// Waits until the page's trimmed text of `css` is `expected`.
    pub async fn wait_for_text(&self, css: &str, expected: &str, timeout: Duration) -> Result<()> {
        let what = format!("{css} reading {expected:?}");
        let last = std::sync::Mutex::new(None);
        let outcome = wait_until(timeout, &what, || async {
            let text = self.text(css).await?;
            let done = text == expected;
            *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
            Ok(done.then_some(()))
        })
        .await;
        let last = last.into_inner().unwrap_or_else(|p| p.into_inner());
        let outcome = outcome.with_context(|| format!("last text of {css}: {last:?}"));
        self.explain(outcome).await
    }

    /// Waits until the page shown is `path` (path and query, as [`Browser::location`]).
    pub async fn wait_for_location(&self, path: &str, timeout: Duration) -> Result<()> {
        let outcome = wait_until(timeout, &format!("the page {path}"), || async {
            Ok((self.location().await? == path).then_some(()))
        })
        .await;
        self.explain(outcome).await
    }

    /// Clicks the one element matching `css`. The page's own refresh may replace the element
    /// between finding and clicking it (a stale element, not clicked): it is then found again,
    /// a few times at most.
    pub async fn click(&self, css: &str) -> Result<()> {
        let mut attempts = 0;
        loop {
            let element = self
                .client
                .find(Locator::Css(css))
                .await
                .with_context(|| format!("finding {css}"))?;
            match element.click().await {
                Err(e) if e.is_stale_element_reference() && attempts < 3 => attempts += 1,
                clicked => return clicked.with_context(|| format!("clicking {css}")),
            }
        }
    }

    /// Types `text` into the one element matching `css`, after clearing it.
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let field = self
            .client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("finding {css}"))?;
        field.clear().await?;
        field
            .send_keys(text)
            .await
            .with_context(|| format!("typing into {css}"))
    }

    /// Accepts the JavaScript dialog (a `window.confirm`) the last action opened, and returns
    /// its text.
    pub async fn accept_dialog(&self, timeout: Duration) -> Result<String> {
        wait_until(timeout, "a dialog to accept", || async {
            let text = self.client.get_alert_text().await?;
            self.client.accept_alert().await?;
            Ok(Some(text))
        })
        .await
    }

    /// Saves a screenshot of the window as `{name}.png` in `BATCHQ_UI_SCREENSHOTS` (created if
    /// need be) or else the test's folder, and returns its path.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let dir = std::env::var_os("BATCHQ_UI_SCREENSHOTS")
            .filter(|d| !d.is_empty())
            .map_or_else(|| self.screenshot_dir.clone(), PathBuf::from);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let png = self
            .client
            .screenshot()
            .await
            .context("taking a screenshot")?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The page shown and the start of its text, for a failure message.
    pub async fn describe(&self) -> String {
        let location = self.location().await.unwrap_or_else(|e| format!("({e})"));
        let text = self
            .client
            .execute(
                "return document.body ? document.body.innerText : '';",
                vec![],
            )
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let start: String = text.chars().take(600).collect();
        format!("page {location}: {start:?}")
    }

    /// Ends the WebDriver session (Chromium quits), then kills chromedriver's process group.
    pub async fn close(self) -> Result<()> {
        let Self { client, driver, .. } = self;
        let closed = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        drop(driver);
        closed
            .context("closing the browser timed out")?
            .context("closing the browser")
    }
}

// ---------------------------------------------------------------------------------------------
// The console

/// A `batchctl ui` of a test: a process of its [`TestEnv`] (so killed with the others when the
/// test ends, one way or another, and its log among theirs), and the address it serves.
#[derive(Debug, Clone)]
pub struct Console {
    pub id: ProcId,
    /// `http://127.0.0.1:PORT`, without the trailing slash.
    pub base: String,
}

impl Console {
    /// The URL of `path` (`/jobs/x`) on the console.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `HOST:PORT` of the console.
    pub fn authority(&self) -> &str {
        self.base.trim_start_matches("http://")
    }
}

impl TestEnv {
    /// Starts `batchctl ui --listen 127.0.0.1:0` in this test's namespace, with `extra`
    /// environment variables (`BATCHQ_UI_TOKEN`), and waits for the URL it prints first.
    pub async fn start_console(&mut self, extra: &[(&str, &str)]) -> Result<Console> {
        let args = ["ui", "--listen", "127.0.0.1:0"]
            .map(str::to_owned)
            .to_vec();
        let mut envs = self.base_env();
        envs.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let id = self.start(Bin::Batchctl, args, envs)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Stdout and stderr share the log: the banner is the first line of stdout, not
            // necessarily of the file.
            let log = self.log_text(id);
            if let Some(url) = log
                .lines()
                .find_map(|line| line.trim().strip_prefix(CONSOLE_BANNER))
            {
                let base = url.trim().trim_end_matches('/').to_owned();
                ensure!(
                    base.starts_with("http://"),
                    "the console printed {url:?}, not an http:// URL"
                );
                return Ok(Console { id, base });
            }
            ensure!(
                self.is_running(id),
                "batchctl ui exited before printing its URL; its log:\n{log}"
            );
            ensure!(
                Instant::now() < deadline,
                "batchctl ui printed no `{CONSOLE_BANNER}URL` line within {START_TIMEOUT:?}; \
                 its log:\n{log}"
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bare HTTP

/// A response as a bare HTTP/1.0 client sees it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case, in the order given.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header of that name (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.0 request to the console at `authority` (`HOST:PORT`; no redirect followed, no
/// cookie kept): `headers` as given, and a form body (`application/x-www-form-urlencoded`)
/// when `form` is `Some`.
pub async fn http(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    form: Option<&[(&str, &str)]>,
) -> Result<HttpResponse> {
    let body = form.map(|fields| {
        let encoded = fields
            .iter()
            .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        ("application/x-www-form-urlencoded", encoded.into_bytes())
    });
    let body = body.as_ref().map(|(kind, bytes)| (*kind, bytes.as_slice()));
    http_with_body(authority, method, path, headers, body).await
}

/// A `multipart/form-data` body of text fields, as a browser sends a form with
/// `enctype="multipart/form-data"`: its content type (with the boundary) and its bytes.
pub fn multipart(fields: &[(&str, &str)]) -> (String, Vec<u8>) {
    let boundary = format!("batchq-test-{}", uuid::Uuid::new_v4().simple());
    let mut body = String::new();
    for (name, value) in fields {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    (
        format!("multipart/form-data; boundary={boundary}"),
        body.into_bytes(),
    )
}

/// [`http`] with a body of the given content type.
pub async fn http_with_body(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
) -> Result<HttpResponse> {
    http_within(
        authority,
        method,
        path,
        headers,
        body,
        Duration::from_secs(10),
    )
    .await
}

/// [`http_with_body`] for an answer that may take up to `limit` to end (an event stream).
pub async fn http_within(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
    limit: Duration,
) -> Result<HttpResponse> {
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {authority}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some((content_type, bytes)) = body {
        request.push_str(&format!("Content-Type: {content_type}\r\n"));
        request.push_str(&format!("Content-Length: {}\r\n", bytes.len()));
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    if let Some((_, bytes)) = body {
        request.extend_from_slice(bytes);
    }
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        stream.write_all(&request).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(limit, exchange)
        .await
        .with_context(|| format!("{method} {path} timed out after {limit:?}"))?
        .with_context(|| format!("{method} {path}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path}: no end of the HTTP header in {response:?}"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("{method} {path}: no status in {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// `application/x-www-form-urlencoded` encoding of one name or value.
fn form_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(char::from(byte));
            }
            b' ' => out.push('+'),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}
