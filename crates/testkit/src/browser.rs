//! ChromeDriver driving Debian's Chromium, for the web console's browser test: it
//! binds a free loopback port itself and says which, and it and the browsers it
//! starts (its process group) are killed on drop.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// ChromeDriver (package chromium-driver): `SWITCHYARD_CHROMEDRIVER`, else
/// `/usr/bin/chromedriver`.
pub fn chromedriver_binary() -> PathBuf {
    browser_file(
        "SWITCHYARD_CHROMEDRIVER",
        "/usr/bin/chromedriver",
        "chromium-driver",
    )
}

/// Chromium (package chromium): `SWITCHYARD_CHROMIUM`, else `/usr/bin/chromium`.
pub fn chromium_binary() -> PathBuf {
    browser_file("SWITCHYARD_CHROMIUM", "/usr/bin/chromium", "chromium")
}

fn browser_file(variable: &str, default: &str, package: &str) -> PathBuf {
    let path = std::env::var(variable).map_or_else(|_| PathBuf::from(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} is not installed: run scripts/install-deps.sh (Debian's {package}), or set {variable}",
        path.display()
    );
    path
}

/// A running ChromeDriver; killed with its browsers on drop.
pub struct ChromeDriver {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl ChromeDriver {
    /// Starts ChromeDriver on a port it picks, waiting (at most 60 s) until it says
    /// which.
    pub fn start() -> ChromeDriver {
        let mut child = Command::new(chromedriver_binary())
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                // "ChromeDriver was started successfully on port 42129."
                if let Some(port) = line
                    .split("on port ")
                    .nth(1)
                    .and_then(|rest| rest.trim_end_matches('.').trim().parse::<u16>().ok())
                    .filter(|_| line.contains("started successfully"))
                {
                    let _ = sender.send(port);
                }
            }
        });
        let port = match receiver.recv_timeout(Duration::from_secs(60)) {
            Ok(port) => port,
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                let _ = child.kill();
                panic!(
                    "chromedriver did not say which port it bound within 60s (exit: {status:?})"
                );
            }
        };
        ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Capabilities of a headless Chromium session with a window of `width` x
    /// `height` CSS pixels.
    pub fn capabilities(width: u32, height: u32) -> serde_json::Map<String, serde_json::Value> {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            serde_json::json!({
                "binary": chromium_binary(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-extensions",
                    "--disable-background-networking",
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        capabilities
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The whole group: ChromeDriver and every browser process it started.
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
