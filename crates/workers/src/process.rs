//! One instance's operating-system process: started in a process group of its own so
//! that everything it forks is signalled with it, under a guard ([`crate::guard`])
//! that kills all it started when it ends or when Switchyard dies (whatever left its
//! process group included), its stdout and stderr captured line by line into
//! Switchyard's log, and stopped by signalling the whole group.
//!
//! A process that does not run as Switchyard's binary and was given no guard program
//! (tests that embed the workers) starts instances unguarded: killed by the kernel if
//! Switchyard dies first (Linux's parent-death signal), their children left for the
//! next start. Every instance carries its owner in its environment
//! ([`OWNER_VARIABLE`]: the pid and start time of the Switchyard process that started
//! it), and so do its children, so a Switchyard that starts after another died kills,
//! with [`reap_orphans`], whatever the dead one's instances still left behind.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncRead;
use tokio::sync::watch;
use tokio_util::codec::{AnyDelimiterCodec, FramedRead};
use tokio_util::task::TaskTracker;

/// The environment variable that names an instance's owner (`<pid>:<start time>`).
pub const OWNER_VARIABLE: &str = "SWITCHYARD_INSTANCE_OWNER";

/// Longest output line logged whole; longer ones are cut at this many bytes.
const MAX_LINE_BYTES: usize = 16 * 1024;
/// Output kept per instance for error messages (its last lines).
const TAIL_BYTES: usize = 4 * 1024;

/// How an instance's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Killed by the kernel for using more than its cgroup's memory.
    OutOfMemory,
}

impl fmt::Display for Exit {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(formatter, "exit status {code}"),
            Exit::OutOfMemory => write!(formatter, "signal: killed (out of memory)"),
            Exit::Signal(signal) => match Signal::try_from(*signal) {
                Ok(Signal::SIGKILL) => write!(formatter, "signal: killed"),
                Ok(known) => write!(formatter, "signal: {}", known.as_str()),
                Err(_) => write!(formatter, "signal: {signal}"),
            },
        }
    }
}

/// What to start.
pub struct Launch<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub directory: &'a Path,
    /// The whole environment: nothing of Switchyard's own is inherited.
    pub environment: &'a [(String, String)],
    pub function: &'a str,
    /// The instance's name in logs (`<function>-<n>`).
    pub instance: &'a str,
    /// Where its output lines go besides Switchyard's log.
    pub logs: Option<Arc<dyn crate::logs::LogSink>>,
}

/// A started instance process.
pub struct InstanceProcess {
    /// The instance's process id, which is also its process group's id.
    pid: i32,
    /// The guard's socket, through which the process group is signalled: the guard,
    /// the instance's parent, keeps its pid from being reused until the guard ends,
    /// which Switchyard cannot. `None` for an unguarded instance, signalled directly.
    guard: Option<std::os::unix::net::UnixStream>,
    exit: watch::Receiver<Option<Exit>>,
    output: Arc<Output>,
    /// The instance's cgroup file of its peak memory, when it has a cgroup.
    memory_peak: Option<PathBuf>,
}

/// The request an instance is working on (tags its log lines) and its last output.
struct Output {
    /// Where output lines go besides Switchyard's log.
    logs: Option<Arc<dyn crate::logs::LogSink>>,
    request: Mutex<Option<String>>,
    tail: Mutex<VecDeque<String>>,
    /// The log of one invocation being collected (for Lambda's `LogType: Tail`): its
    /// request id and its lines so far.
    invocation: Mutex<Option<(String, String)>>,
    /// Each captured stream's pipe and how far it was read and handled, so the log
    /// of an invocation can wait until what it printed before answering is in.
    streams: Mutex<Vec<Arc<StreamProgress>>>,
}

/// How far one captured pipe was read, and handled line by line.
struct StreamProgress {
    fd: std::os::fd::RawFd,
    read: std::sync::atomic::AtomicU64,
    handled: std::sync::atomic::AtomicU64,
}

impl StreamProgress {
    /// Nothing left in the pipe, and everything read handled.
    fn drained(&self) -> bool {
        use std::sync::atomic::Ordering;
        let mut pending: nix::libc::c_int = 0;
        // SAFETY: FIONREAD writes one int; the fd is the pipe the capture reads
        // (a failed call, e.g. after it closed, counts as nothing pending).
        let result = unsafe { nix::libc::ioctl(self.fd, nix::libc::FIONREAD, &mut pending) };
        (result != 0 || pending == 0)
            && self.read.load(Ordering::SeqCst) == self.handled.load(Ordering::SeqCst)
    }
}

/// Counts what is read through it.
struct Counting<R> {
    inner: R,
    progress: Arc<StreamProgress>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buffer.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(context, buffer);
        let read = (buffer.filled().len() - before) as u64;
        self.progress
            .read
            .fetch_add(read, std::sync::atomic::Ordering::SeqCst);
        polled
    }
}

impl InstanceProcess {
    /// Starts `launch` in a new process group (and in `cgroup`, which it then owns:
    /// emptied and removed when the process ends, by a task of `tasks`), forked by
    /// the spawner thread: under a guard when there is a guard program, else directly.
    pub(crate) async fn spawn(
        launch: &Launch<'_>,
        cgroup: Option<crate::cgroup::InstanceCgroup>,
        tasks: &TaskTracker,
    ) -> std::io::Result<InstanceProcess> {
        // A relative program with a `/` is the function's own (`./bootstrap`): found
        // in its directory, not Switchyard's (std leaves that case unspecified).
        let program = Path::new(launch.program);
        let program = if launch.program.contains('/') && program.is_relative() {
            launch.directory.join(program)
        } else {
            program.to_owned()
        };
        let cgroup = cgroup.map(Arc::new);
        let memory_peak = cgroup.as_ref().map(|cgroup| cgroup.peak_file());
        let (mut command, guard) = match crate::guard::program() {
            Some(guard_program) => {
                let (command, ours, theirs) =
                    crate::guard::command(&guard_program, launch.instance)?;
                (command, Some((ours, theirs)))
            }
            None => (unguarded_command(&program, launch, cgroup.clone()), None),
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let handle = tokio::runtime::Handle::current();
        let (spawned, receive) = tokio::sync::oneshot::channel();
        let sent = spawner().send(Box::new(move || {
            let _runtime = handle.enter();
            let _ = spawned.send(command.spawn());
        }));
        let spawned = match sent {
            Ok(()) => receive
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread is gone"))),
            Err(_) => Err(std::io::Error::other("the spawner thread is gone")),
        };
        // The guard's instance, started once the guard is: its pid, and the link whose
        // end (or Switchyard's) tells the guard to kill everything.
        let started = match (spawned, guard) {
            (Ok(child), None) => child
                .id()
                .and_then(|pid| i32::try_from(pid).ok())
                .ok_or_else(|| std::io::Error::other("the started process has no id"))
                .map(|pid| (child, pid, None)),
            (Ok(child), Some((ours, theirs))) => {
                drop(theirs);
                let spec = crate::guard::Spec {
                    program,
                    args: launch.args.to_vec(),
                    directory: launch.directory.to_owned(),
                    environment: launch.environment.to_vec(),
                    cgroup: cgroup.as_deref().cloned(),
                };
                // A guard that could not start the instance exits by itself (its
                // handle, dropped, is reaped by the runtime).
                crate::guard::hand_over(ours, &spec)
                    .await
                    .map(|(pid, link, signals)| (child, pid, Some((link, signals))))
            }
            (Err(error), _) => Err(error),
        };
        let (mut child, pid, guard) = match started {
            Ok(started) => started,
            Err(error) => {
                if let Some(cgroup) = cgroup {
                    let _ = tokio::task::spawn_blocking(move || cgroup.kill_and_remove()).await;
                }
                return Err(error);
            }
        };
        let output = Arc::new(Output {
            logs: launch.logs.clone(),
            request: Mutex::new(None),
            tail: Mutex::new(VecDeque::new()),
            invocation: Mutex::new(None),
            streams: Mutex::new(Vec::new()),
        });
        let (exit_sender, exit) = watch::channel(None);
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(capture(
                stdout,
                "stdout",
                launch.function.to_owned(),
                launch.instance.to_owned(),
                output.clone(),
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(capture(
                stderr,
                "stderr",
                launch.function.to_owned(),
                launch.instance.to_owned(),
                output.clone(),
            ));
        }
        let (link, guard) = guard.unzip();
        tasks.spawn(async move {
            // A guard ends as its instance did, once it has killed what the instance
            // left.
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(code), _) => Exit::Code(code),
                        (None, Some(signal)) => Exit::Signal(signal),
                        (None, None) => Exit::Code(-1),
                    }
                }
                Err(_) => Exit::Code(-1),
            };
            match link {
                // The guard killed the group while the instance's zombie still held
                // its id; the id may be another's now.
                Some(link) => drop(link),
                // Whatever the instance forked dies with it.
                None => {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            let exit = match &cgroup {
                Some(cgroup) if exit == Exit::Signal(9) && cgroup.oom_killed() => Exit::OutOfMemory,
                _ => exit,
            };
            // Said at once (no invocation may pick a dead instance), then the cgroup
            // emptied (what left the process group) and removed.
            let _ = exit_sender.send(Some(exit));
            if let Some(cgroup) = cgroup {
                let _ = tokio::task::spawn_blocking(move || cgroup.kill_and_remove()).await;
            }
        });
        Ok(InstanceProcess {
            pid,
            guard,
            exit,
            output,
            memory_peak,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The most memory the instance has used since it started, in bytes (Lambda's
    /// "Max Memory Used"): its cgroup's peak, every process of it together, when it
    /// has a cgroup; else its main process's peak resident size (`VmHWM`).
    pub fn peak_memory(&self) -> Option<u64> {
        if let Some(bytes) = self
            .memory_peak
            .as_ref()
            .and_then(|file| std::fs::read_to_string(file).ok())
            .and_then(|text| text.trim().parse().ok())
        {
            return Some(bytes);
        }
        // Once the process has ended (and been reaped) its pid may be another's.
        if self.exit().is_some() {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// How the process ended, once it has.
    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits until the process has ended.
    pub async fn exited(&self) -> Exit {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(exit) => exit.expect("waited for an exit"),
            // The watcher is gone only after sending the exit.
            Err(_) => self.exit().unwrap_or(Exit::Code(-1)),
        }
    }

    /// Tags the instance's log lines with the request it works on (kept until the
    /// next: what it prints just after answering still names the request).
    pub fn set_request(&self, request: Option<&str>) {
        *self.output.request.lock().expect("output lock") = request.map(str::to_owned);
    }

    /// Starts collecting what the instance prints for invocation `request` (one
    /// invocation at a time).
    pub fn start_log(&self, request: &str) {
        *self.output.invocation.lock().expect("output lock") =
            Some((request.to_owned(), String::new()));
    }

    /// What the instance printed for the invocation of [`Self::start_log`]: waits
    /// (at most 100 ms) until what it wrote before answering has been read.
    pub async fn finish_log(&self) -> String {
        self.drained().await;
        self.output
            .invocation
            .lock()
            .expect("output lock")
            .take()
            .map(|(_, log)| log)
            .unwrap_or_default()
    }

    /// Waits (at most 100 ms) until what the instance wrote so far has been read
    /// and handled.
    pub async fn drained(&self) {
        let streams: Vec<Arc<StreamProgress>> =
            self.output.streams.lock().expect("output lock").clone();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        while !streams.iter().all(|stream| stream.drained())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The instance's last lines of output, oldest first.
    pub fn tail(&self) -> String {
        let tail = self.output.tail.lock().expect("output lock");
        tail.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILLs the process and everything in its group, at once.
    pub fn kill(&self) {
        if self.exit().is_none() {
            self.signal_group(Signal::SIGKILL);
        }
    }

    /// SIGTERMs the process group, then SIGKILLs it if the process has not ended
    /// after `grace`.
    pub async fn stop(&self, grace: Duration) {
        if self.exit().is_some() {
            return;
        }
        self.signal_group(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            self.kill();
            self.exited().await;
        }
    }
}

impl InstanceProcess {
    /// Signals the instance's process group: through its guard (a gone guard's
    /// instance has ended), or directly.
    fn signal_group(&self, signal: Signal) {
        match &self.guard {
            Some(guard) => {
                let _ = std::io::Write::write(&mut &*guard, &[signal as i32 as u8]);
            }
            None => {
                let _ = killpg(Pid::from_raw(self.pid), signal);
            }
        }
    }
}

impl Drop for InstanceProcess {
    /// An instance dropped before it was stopped (a start abandoned at shutdown, a
    /// failure after the fork) is not left running.
    fn drop(&mut self) {
        self.kill();
    }
}

/// An instance's command when there is no guard: the instance is Switchyard's own
/// child, joins its cgroups and asks for the parent-death signal before exec.
fn unguarded_command(
    program: &Path,
    launch: &Launch<'_>,
    cgroup: Option<Arc<crate::cgroup::InstanceCgroup>>,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command
        .args(launch.args)
        .current_dir(launch.directory)
        .env_clear()
        .envs(launch.environment.iter().map(|(name, value)| (name, value)))
        .process_group(0)
        // A child whose handle is dropped unwaited (its start abandoned before
        // the spawn returned) is not left running.
        .kill_on_drop(true);
    let parent = nix::unistd::getpid();
    // SAFETY: runs in the forked child before exec; prctl, getppid and the
    // cgroup join (open/write/close on prepared paths) are async-signal-safe and
    // allocate nothing.
    unsafe {
        command.pre_exec(move || {
            if let Some(cgroup) = &cgroup {
                cgroup.join_from_child()?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent died between fork and prctl: do not outlive it. (No
            // allocation here: a raw OS error.)
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    command
}

/// The thread every instance (or its guard) is forked from. The parent-death signal
/// of an unguarded instance follows the thread that forked, so it must live as long
/// as the process (a runtime's blocking threads come and go); and a fork of this big
/// process, or one whose child waits for the kernel before exec (joining a cgroup v1
/// takes milliseconds), holds up this thread, not a runtime worker.
fn spawner() -> &'static std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>> {
    static SPAWNER: std::sync::OnceLock<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>> =
        std::sync::OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("instance-spawner".to_owned())
            .spawn(move || {
                for job in receiver {
                    // A job that panics must not end the thread: every instance it
                    // forked would get its parent-death signal.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .expect("starting the instance spawner thread");
        sender
    })
}

/// Logs `stream` line by line, tagged with the function, the instance and the
/// request in progress; keeps the last lines for error messages.
async fn capture(
    stream: impl AsyncRead + Unpin + std::os::fd::AsRawFd,
    name: &'static str,
    function: String,
    instance: String,
    output: Arc<Output>,
) {
    use futures::StreamExt;
    use std::sync::atomic::Ordering;
    let progress = Arc::new(StreamProgress {
        fd: stream.as_raw_fd(),
        read: std::sync::atomic::AtomicU64::new(0),
        handled: std::sync::atomic::AtomicU64::new(0),
    });
    output
        .streams
        .lock()
        .expect("output lock")
        .push(progress.clone());
    let mut lines = FramedRead::new(
        Counting {
            inner: stream,
            progress: progress.clone(),
        },
        AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_LINE_BYTES),
    );
    while let Some(line) = lines.next().await {
        let (line, counted) = match line {
            Ok(line) => (line, false),
            // A line over the limit: the codec drops the rest of it.
            Err(tokio_util::codec::AnyDelimiterCodecError::MaxChunkLengthExceeded) => {
                // What was read of it is handled (dropped).
                progress
                    .handled
                    .store(progress.read.load(Ordering::SeqCst), Ordering::SeqCst);
                (Bytes::from_static(b"[line longer than 16 KiB cut]"), true)
            }
            Err(_) => break,
        };
        // Lambda's runtime clients keep one record's lines together with `\r` (a
        // traceback is one record): each line logged as its own, tagged, so an
        // instance cannot write an untagged line into Switchyard's log.
        let text = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(&line)).into_owned();
        let request = output.request.lock().expect("output lock").clone();
        for part in text.split('\r') {
            tracing::info!(target: "switchyard::function", function = %function, instance = %instance, request_id = request.as_deref().unwrap_or(""), stream = name, "{part}");
            if let Some(logs) = &output.logs {
                logs.line(crate::logs::LogLine::new(
                    &function,
                    &instance,
                    request.as_deref(),
                    name,
                    part.to_owned(),
                ));
            }
        }
        if let Some((collecting, log)) = output.invocation.lock().expect("output lock").as_mut()
            && request.as_deref() == Some(collecting.as_str())
        {
            log.push_str(&text.replace('\r', "\n"));
            log.push('\n');
            // Kept small: only its end is returned.
            if log.len() > 64 * 1024 {
                let mut cut = log.len() - 32 * 1024;
                while !log.is_char_boundary(cut) {
                    cut += 1;
                }
                log.drain(..cut);
            }
        }
        {
            let mut tail = output.tail.lock().expect("output lock");
            tail.push_back(text.replace('\r', "\n"));
            while tail.iter().map(String::len).sum::<usize>() > TAIL_BYTES && tail.len() > 1 {
                tail.pop_front();
            }
        }
        // The line and its newline, as read (a line cut at the limit was counted
        // above).
        if !counted {
            progress
                .handled
                .fetch_add(line.len() as u64 + 1, Ordering::SeqCst);
        }
    }
    // Closed: nothing more will come.
    progress
        .handled
        .store(progress.read.load(Ordering::SeqCst), Ordering::SeqCst);
}

/// This process's owner mark for its instances: `<pid namespace>:<pid>:<start
/// time>` (the start time tells a live owner from a later process that reuses its
/// pid; the namespace keeps a Switchyard from judging one in another container).
pub fn owner_mark() -> String {
    let pid = std::process::id();
    format!(
        "{}:{pid}:{}",
        pid_namespace("self").unwrap_or_default(),
        start_time(pid as i32).map_or_else(String::new, |time| time.to_string())
    )
}

/// The pid namespace of `/proc/<process>` (its inode number).
fn pid_namespace(process: &str) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{process}/ns/pid")).ok()?;
    let link = link.to_str()?;
    link.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn start_time(pid: i32) -> Option<u64> {
    process_stat(pid).map(|process| process.start)
}

/// What the process table says of one process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcessStat {
    pub(crate) pid: i32,
    pub(crate) parent: i32,
    /// Ended, not yet reaped.
    pub(crate) zombie: bool,
    /// Clock ticks since boot: with the pid, tells a process from a later one that
    /// reuses its pid.
    pub(crate) start: u64,
}

/// `/proc/<pid>/stat`: state (field 3), parent (4) and start time (22).
pub(crate) fn process_stat(pid: i32) -> Option<ProcessStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(ProcessStat {
        pid,
        parent: fields.get(1)?.parse().ok()?,
        zombie: matches!(fields.first(), Some(&"Z") | Some(&"X")),
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Whether the Switchyard process an owner mark names still runs. A mark from
/// another pid namespace, or a malformed one, is taken for a live owner: nothing is
/// killed on a guess.
pub fn owner_alive(mark: &str) -> bool {
    let parts: Vec<&str> = mark.split(':').collect();
    let (pid, start) = match parts[..] {
        [namespace, pid, start] => {
            if namespace.parse::<u64>().ok() != pid_namespace("self") {
                return true;
            }
            (pid, start)
        }
        // Marks written before the namespace was part of them.
        [pid, start] => (pid, start),
        _ => return true,
    };
    pid.parse::<i32>()
        .ok()
        .is_some_and(|pid| start_time(pid).map(|time| time.to_string()).as_deref() == Some(start))
}

/// The owner mark in a process's environment, if it has one.
fn owner_of(pid: i32) -> Option<String> {
    let environment = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{OWNER_VARIABLE}=");
    environment
        .split(|byte| *byte == 0)
        .find_map(|variable| variable.strip_prefix(prefix.as_bytes()))
        .map(|owner| String::from_utf8_lossy(owner).into_owned())
}

/// Kills the instances (and their children) of Switchyard processes that are gone:
/// processes of this pid namespace whose [`OWNER_VARIABLE`] names an owner that no
/// longer runs. Each is held by a pidfd while its mark is read again and it is
/// signalled, so a pid reused in between is not hit. Returns how many it killed.
pub fn reap_orphans() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let ours = pid_namespace("self");
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        if pid_namespace(&pid.to_string()) != ours {
            continue;
        }
        let Some(owner) = owner_of(pid) else {
            continue;
        };
        if owner_alive(&owner) {
            continue;
        }
        // SAFETY: a plain syscall on integers; the descriptor is closed below.
        let pidfd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) } as i32;
        if pidfd < 0 {
            continue;
        }
        // The pid still names the process that carries the dead owner's mark.
        if owner_of(pid).as_deref() == Some(owner.as_str()) {
            if nix::unistd::getpgid(Some(Pid::from_raw(pid))).ok() == Some(Pid::from_raw(pid)) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            // SAFETY: signals the process the descriptor holds.
            let sent = unsafe {
                nix::libc::syscall(
                    nix::libc::SYS_pidfd_send_signal,
                    pidfd,
                    nix::libc::SIGKILL,
                    std::ptr::null::<nix::libc::siginfo_t>(),
                    0,
                )
            };
            if sent == 0 {
                killed += 1;
            }
        }
        // SAFETY: closes the descriptor opened above.
        unsafe {
            nix::libc::close(pidfd);
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::kill;

    fn launch<'a>(args: &'a [String], environment: &'a [(String, String)]) -> Launch<'a> {
        Launch {
            program: "/bin/sh",
            args,
            directory: Path::new("/"),
            environment,
            function: "test",
            instance: "test-1",
            logs: None,
        }
    }

    #[tokio::test]
    async fn a_stopped_instance_takes_its_children_with_it() {
        let directory = tempfile::tempdir().unwrap();
        let pid_file = directory.path().join("child.pid");
        // The shell starts a child that ignores SIGTERM, writes its pid, and waits.
        let script = format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; while :; do sleep 1; done' & wait",
            pid_file.display()
        );
        let args = vec!["-c".to_owned(), script];
        let process = InstanceProcess::spawn(&launch(&args, &[]), None, &TaskTracker::new())
            .await
            .unwrap();
        let child = loop {
            if let Ok(pid) = std::fs::read_to_string(&pid_file)
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                break pid;
            }
            assert!(process.exit().is_none(), "the shell exited early");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        process.stop(Duration::from_millis(200)).await;
        assert!(process.exit().is_some());
        // The child ignored SIGTERM; the group's SIGKILL ended it. Reaped by init
        // (or our own waiter): poll until it is gone, bounded.
        let gone = async {
            while kill(Pid::from_raw(child), None).is_ok()
                && !std::fs::read_to_string(format!("/proc/{child}/stat"))
                    .is_ok_and(|stat| stat.contains(") Z"))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("the child outlived its instance");
    }

    #[tokio::test]
    async fn output_is_kept_line_by_line_and_the_exit_reported() {
        let args = vec![
            "-c".to_owned(),
            "echo one; echo two >&2; printf 'no newline'; exit 3".to_owned(),
        ];
        let process = InstanceProcess::spawn(&launch(&args, &[]), None, &TaskTracker::new())
            .await
            .unwrap();
        assert_eq!(process.exited().await, Exit::Code(3));
        // Output readers may finish just after the exit.
        let complete = async {
            while !process.tail().contains("no newline") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), complete)
            .await
            .expect("output captured");
        let tail = process.tail();
        assert!(tail.contains("one") && tail.contains("two"), "{tail}");
        assert_eq!(Exit::Signal(9).to_string(), "signal: killed");
    }

    #[tokio::test]
    async fn the_environment_is_only_what_was_given() {
        let directory = tempfile::tempdir().unwrap();
        let out = directory.path().join("env");
        let args = vec!["-c".to_owned(), format!("env > {}", out.display())];
        let environment = vec![("ONLY".to_owned(), "this".to_owned())];
        let process =
            InstanceProcess::spawn(&launch(&args, &environment), None, &TaskTracker::new())
                .await
                .unwrap();
        assert_eq!(process.exited().await, Exit::Code(0));
        let seen = std::fs::read_to_string(out).unwrap();
        assert!(seen.contains("ONLY=this"), "{seen}");
        assert!(!seen.contains("CARGO"), "{seen}");
    }

    #[tokio::test]
    async fn a_relative_program_is_found_in_the_function_directory() {
        use std::os::unix::fs::PermissionsExt;
        let directory = tempfile::tempdir().unwrap();
        let script = directory.path().join("bootstrap");
        std::fs::write(&script, "#!/bin/sh\nexit 7\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let process = InstanceProcess::spawn(
            &Launch {
                program: "./bootstrap",
                args: &[],
                directory: directory.path(),
                environment: &[],
                function: "test",
                instance: "test-1",
                logs: None,
            },
            None,
            &TaskTracker::new(),
        )
        .await
        .unwrap();
        assert_eq!(process.exited().await, Exit::Code(7));
    }

    #[test]
    fn this_process_is_a_live_owner_and_marks_of_other_namespaces_are_left_alone() {
        let mark = owner_mark();
        let parts: Vec<&str> = mark.split(':').collect();
        assert_eq!(parts.len(), 3, "{mark}");
        assert!(parts[0].parse::<u64>().is_ok(), "{mark}");
        assert_eq!(parts[1], std::process::id().to_string());
        assert!(parts[2].parse::<u64>().is_ok(), "{mark}");
        assert!(owner_alive(&mark));
        // The same pid with another start time: a process that is gone.
        assert!(!owner_alive(&format!("{}:{}:1", parts[0], parts[1])));
        // Another pid namespace (a container's Switchyard): never judged from here.
        assert!(owner_alive(&format!("1:{}:1", parts[1])));
        assert!(owner_alive("garbage"));
        // Marks from before the namespace was in them: judged by pid and start time.
        assert!(owner_alive(&format!("{}:{}", parts[1], parts[2])));
        assert!(!owner_alive(&format!("{}:1", parts[1])));
    }
}
