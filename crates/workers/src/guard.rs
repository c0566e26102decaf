//! An instance's guard: a small process between Switchyard and the instance that
//! makes sure nothing the instance starts outlives Switchyard, on every host (cgroup
//! v2, cgroup v1, process groups only), without waiting for a next start.
//!
//! Switchyard starts its own binary again with [`GUARD_ARGUMENT`] (`main` calls
//! [`run_if_requested`] first, which turns that process into a guard) and hands it
//! one end of a socket pair whose other end only Switchyard holds. The guard starts
//! the instance (a process group of its own, its cgroups joined before exec, killed by
//! the kernel if the guard dies) and reports its pid. The guard is the child
//! subreaper of everything below it: a descendant whose parent dies (a double fork, a
//! daemon that `setsid`s) is re-parented to the guard rather than to init, so the
//! whole tree is always found by following parent pids down from the guard.
//!
//! - Switchyard signals the instance's process group (SIGTERM to stop it, SIGKILL)
//!   through the socket, one byte per signal: the guard holds the instance, once
//!   ended, as an unreaped zombie until the guard itself ends, so the pid and process
//!   group id it signals cannot have been reused by another process.
//! - When the instance ends, the guard SIGKILLs its process group and every
//!   descendant left, then ends the way the instance did (its exit code, or the same
//!   signal), so Switchyard reads the instance's exit, and an out-of-memory kill, from
//!   the guard's as before.
//! - When Switchyard goes away, however it ends (its end of the socket reads end of
//!   file once the kernel closed its last descriptor, SIGKILL included), the guard
//!   kills the instance's cgroups (`cgroup.kill` on v2, every member on v1), its
//!   process group and every descendant, removes the cgroups, and exits.
//!
//! The guard stays outside the instance's cgroups (its memory is not the function's)
//! and in a process group of its own (a signal to Switchyard's group does not reach
//! it); it blocks SIGTERM, SIGINT, SIGHUP and SIGQUIT, which are for Switchyard and the
//! instance.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{Id, WaitPidFlag, waitid, waitpid};
use nix::unistd::{Pid, getpid, getppid};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::cgroup::InstanceCgroup;
use crate::process::process_stat;

/// The first argument that makes Switchyard's binary an instance's guard (not a
/// command for people: hidden from `--help`).
pub const GUARD_ARGUMENT: &str = "__instance-guard";

/// The program instances are guarded by; without one (a process that is not
/// Switchyard's binary and was given none), instances are started unguarded.
static PROGRAM: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Turns this process into an instance's guard when it was started as one (and then
/// never returns); otherwise records that this executable serves as the guard of its
/// own instances. Call it first in `main`, before any thread starts.
pub fn run_if_requested() {
    let mut arguments = std::env::args_os().skip(1);
    if arguments.next().as_deref() != Some(OsStr::new(GUARD_ARGUMENT)) {
        // The running binary, even if its file was replaced since (an upgrade).
        set_program("/proc/self/exe");
        return;
    }
    match arguments
        .next()
        .and_then(|control| control.to_str()?.parse::<RawFd>().ok())
    {
        Some(control) => guard(control),
        None => {
            eprintln!("{GUARD_ARGUMENT} is started by switchyard for its function instances");
            std::process::exit(2);
        }
    }
}

/// Guards instances with `program`: Switchyard's binary (whose `main` calls
/// [`run_if_requested`]), for a process that embeds the workers without being that
/// binary (tests that run Switchyard in-process).
pub fn set_program(program: impl Into<PathBuf>) {
    *PROGRAM.lock().expect("guard program lock") = Some(program.into());
}

pub(crate) fn program() -> Option<PathBuf> {
    PROGRAM.lock().expect("guard program lock").clone()
}

/// What Switchyard asks a guard to start.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Spec {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) directory: PathBuf,
    /// The instance's whole environment (the guard's own is empty).
    pub(crate) environment: Vec<(String, String)>,
    pub(crate) cgroup: Option<InstanceCgroup>,
}

/// The guard's one answer.
#[derive(Debug, Serialize, Deserialize)]
enum Report {
    Started {
        pid: i32,
    },
    Failed {
        os_error: Option<i32>,
        message: String,
    },
}

/// Switchyard's end of a guard's socket: held until the guard has ended; once every
/// descriptor of it is closed (the kernel closes them when Switchyard dies), the guard
/// kills everything.
pub(crate) type Link = tokio::io::BufReader<tokio::net::UnixStream>;

/// The command that starts a guard (stdin, stdout and stderr left for the caller to
/// set: the instance inherits the guard's), with Switchyard's end of its socket and
/// the guard's (to be closed once the guard is started).
pub(crate) fn command(
    program: &Path,
    instance: &str,
) -> std::io::Result<(tokio::process::Command, UnixStream, UnixStream)> {
    // Both ends close on exec: no other process Switchyard starts inherits one.
    let (ours, theirs) = UnixStream::pair()?;
    let inherited = theirs.as_raw_fd();
    let mut command = tokio::process::Command::new(program);
    command
        .arg0("switchyard")
        .arg(GUARD_ARGUMENT)
        .arg(inherited.to_string())
        // For `ps` only.
        .arg(instance)
        .env_clear()
        .current_dir("/")
        .process_group(0);
    // SAFETY: runs in the forked child before exec; fcntl is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // The guard's end, and only it, survives the exec.
            fcntl(inherited, FcntlArg::F_SETFD(FdFlag::empty()))?;
            Ok(())
        });
    }
    Ok((command, ours, theirs))
}

/// Sends a started guard what to start and waits for its answer: the instance's pid
/// (with the link, and a handle on the same socket to signal the instance's process
/// group through: one byte, the signal's number), or why it could not start (an OS
/// error as `spawn` gives it, so it reads the same as an unguarded start's).
pub(crate) async fn hand_over(
    ours: UnixStream,
    spec: &Spec,
) -> std::io::Result<(i32, Link, UnixStream)> {
    ours.set_nonblocking(true)?;
    let signals = ours.try_clone()?;
    let mut link = tokio::io::BufReader::new(tokio::net::UnixStream::from_std(ours)?);
    let mut message = serde_json::to_vec(spec).map_err(std::io::Error::other)?;
    message.push(b'\n');
    link.get_mut().write_all(&message).await?;
    let mut answer = String::new();
    if link.read_line(&mut answer).await? == 0 {
        return Err(std::io::Error::other(
            "the instance's guard ended before it started the instance",
        ));
    }
    match serde_json::from_str(&answer).map_err(std::io::Error::other)? {
        Report::Started { pid } => Ok((pid, link, signals)),
        Report::Failed {
            os_error: Some(code),
            ..
        } => Err(std::io::Error::from_raw_os_error(code)),
        Report::Failed { message, .. } => Err(std::io::Error::other(message)),
    }
}

/// The guard process: starts the instance `control` asks for, then waits for the
/// instance to end or Switchyard to go away.
fn guard(control: RawFd) -> ! {
    // SAFETY: the descriptor Switchyard passed for this; nothing else here owns it.
    let control = unsafe { UnixStream::from_raw_fd(control) };
    // Not for the instance.
    let _ = fcntl(control.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    // Orphans of the instance's tree come here, not to init.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let mut blocked = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        blocked.add(signal);
    }
    // Blocked before the instance starts, so its end cannot be missed (the instance
    // unblocks them before exec).
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None);
    let mut children = SigSet::empty();
    children.add(Signal::SIGCHLD);
    let ended = SignalFd::with_flags(&children, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC);

    let mut line = String::new();
    match std::io::BufReader::new(&control).read_line(&mut line) {
        Ok(read) if read > 0 => {}
        // Switchyard went away before saying what to start.
        _ => std::process::exit(0),
    }
    let started = match (serde_json::from_str::<Spec>(&line), ended) {
        (Ok(spec), Ok(ended)) => start_instance(&spec).map(|pid| (spec, pid, ended)),
        (Err(error), _) => Err(std::io::Error::other(format!(
            "the instance's guard could not read what to start: {error}"
        ))),
        (_, Err(error)) => Err(std::io::Error::other(format!(
            "the instance's guard could not watch it: {error}"
        ))),
    };
    let (spec, instance, ended) = match started {
        Ok(started) => started,
        Err(error) => {
            report(
                &control,
                &Report::Failed {
                    os_error: error.raw_os_error(),
                    message: error.to_string(),
                },
            );
            std::process::exit(0);
        }
    };
    if !report(
        &control,
        &Report::Started {
            pid: instance.as_raw(),
        },
    ) {
        switchyard_gone(spec.cgroup.as_ref(), instance);
    }
    let mut buffer = [0u8; 64];
    loop {
        let mut ready = [
            PollFd::new(control.as_fd(), PollFlags::POLLIN),
            PollFd::new(ended.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut ready, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            // Nothing can be watched any more: the safe side is to end everything.
            Err(_) => switchyard_gone(spec.cgroup.as_ref(), instance),
        }
        if ready[0].revents().is_some_and(|events| !events.is_empty()) {
            match (&control).read(&mut buffer) {
                // End of file (or an error): Switchyard's last descriptor is closed.
                Ok(0) => switchyard_gone(spec.cgroup.as_ref(), instance),
                // Signals for the instance's process group, which still exists: the
                // instance, ended or not, is not reaped before the guard ends.
                Ok(read) => {
                    for signal in &buffer[..read] {
                        if let Ok(signal) = Signal::try_from(i32::from(*signal)) {
                            let _ = killpg(instance, signal);
                        }
                    }
                }
                Err(error) if error.kind() != std::io::ErrorKind::Interrupted => {
                    switchyard_gone(spec.cgroup.as_ref(), instance)
                }
                Err(_) => {}
            }
        }
        while let Ok(Some(_)) = ended.read_signal() {}
        if let Some(end) = reap_until(instance) {
            // Its group, whose id the zombie holds until it is reaped.
            let _ = killpg(instance, Signal::SIGKILL);
            let _ = waitpid(instance, None);
            kill_descendants();
            end_like(end);
        }
    }
}

/// Writes the guard's answer; false if Switchyard is gone.
fn report(mut control: &UnixStream, report: &Report) -> bool {
    let mut message = serde_json::to_vec(report).unwrap_or_default();
    message.push(b'\n');
    control.write_all(&message).is_ok()
}

/// Starts the instance in a process group of its own, joined to its cgroups, killed by
/// the kernel if the guard dies.
fn start_instance(spec: &Spec) -> std::io::Result<Pid> {
    let guard = getpid();
    let cgroup = spec.cgroup.clone();
    let mut command = std::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .current_dir(&spec.directory)
        .env_clear()
        .envs(spec.environment.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::null())
        // stdout and stderr: the guard's, which are Switchyard's capture pipes.
        .process_group(0);
    // SAFETY: runs in the forked child before exec; sigprocmask, the cgroup join
    // (open/write/close on prepared paths), prctl and getppid are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // The guard's blocked signals are not the instance's (a signal mask
            // survives exec, and std leaves it as it is).
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            if let Some(cgroup) = &cgroup {
                cgroup.join_from_child()?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The guard died between fork and prctl: do not outlive it.
            if getppid() != guard {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    // Not waited through the handle: the guard reaps every child itself.
    let child = command.spawn()?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// How a child ended: its exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Code(i32),
    Signal(i32),
}

/// Reaps the children that ended (orphans re-parented here) until the instance has
/// ended, whose end is only observed (`WNOWAIT`): it stays a zombie holding its pid.
/// (libc's `waitid` rather than nix's: nix cannot represent a real-time signal as a
/// cause of death, and must not lose the instance's.)
fn reap_until(instance: Pid) -> Option<End> {
    loop {
        // SAFETY: waitid fills the zeroed siginfo_t it is given.
        let (result, info) = unsafe {
            let mut info: nix::libc::siginfo_t = std::mem::zeroed();
            let result = nix::libc::waitid(
                nix::libc::P_ALL,
                0,
                &mut info,
                nix::libc::WEXITED | nix::libc::WNOHANG | nix::libc::WNOWAIT,
            );
            (result, info)
        };
        // SAFETY: after a successful waitid, si_pid and si_status are set (si_pid 0:
        // no child has ended).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if result != 0 || pid == 0 {
            return None;
        }
        if pid == instance.as_raw() {
            return Some(if info.si_code == nix::libc::CLD_EXITED {
                End::Code(status)
            } else {
                End::Signal(status)
            });
        }
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
}

/// Switchyard is gone: kills everything the instance started, removes its cgroups
/// (and the owner's, once empty), and exits.
fn switchyard_gone(cgroup: Option<&InstanceCgroup>, instance: Pid) -> ! {
    if let Some(cgroup) = cgroup {
        cgroup.kill();
    }
    // Not reaped yet: the group's id is still the instance's.
    let _ = killpg(instance, Signal::SIGKILL);
    kill_descendants();
    // Reaped, so their cgroups can go: SIGKILLed processes end within moments (one
    // in the kernel's uninterruptible sleep may take longer: not waited for past 2 s).
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    if let Some(cgroup) = cgroup {
        cgroup.remove_with_owner();
    }
    std::process::exit(0);
}

/// SIGKILLs every descendant of the guard, pass after pass, until the guard has no
/// child left (not even an unreaped one: then nothing lives below it, as whatever
/// lost its parent was re-parented to the guard) or a pass finds no process it has
/// not signalled yet. A process sent SIGKILL forks no more, and a child forked
/// before the signal is in the process table by the next pass, so none is missed;
/// the bound is for a tree that outgrows every pass.
fn kill_descendants() {
    let guard = getpid().as_raw();
    let mut signalled = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Most instances leave nothing: no scan of the process table then.
        let any_child = waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        );
        if any_child == Err(Errno::ECHILD) {
            return;
        }
        let mut found = false;
        for process in descendants(guard) {
            if process.zombie {
                if process.parent == guard {
                    let _ = waitpid(Pid::from_raw(process.pid), Some(WaitPidFlag::WNOHANG));
                }
                continue;
            }
            if signalled.insert((process.pid, process.start)) {
                let _ = kill(Pid::from_raw(process.pid), Signal::SIGKILL);
                found = true;
            }
        }
        if !found || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every process below `root`, from the process table's parent pids.
pub(crate) fn descendants(root: i32) -> Vec<crate::process::ProcessStat> {
    let mut by_parent: HashMap<i32, Vec<crate::process::ProcessStat>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(process) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse().ok())
                .and_then(process_stat)
            {
                by_parent.entry(process.parent).or_default().push(process);
            }
        }
    }
    let mut found = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for child in by_parent.remove(&parent).unwrap_or_default() {
            parents.push(child.pid);
            found.push(child);
        }
    }
    found
}

/// Ends the guard the way the instance ended, so Switchyard reads the instance's end
/// from the guard's: the same exit code, or death by the same signal (without a core
/// dump of the guard's own).
fn end_like(end: End) -> ! {
    match end {
        End::Code(code) => std::process::exit(code),
        End::Signal(signal) => {
            let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
            let _ = nix::sys::prctl::set_dumpable(false);
            // SAFETY: the default action for a signal number the kernel reported, then
            // that signal unblocked and raised in this single-threaded process.
            unsafe {
                nix::libc::signal(signal, nix::libc::SIG_DFL);
                let mut set: nix::libc::sigset_t = std::mem::zeroed();
                nix::libc::sigemptyset(&mut set);
                nix::libc::sigaddset(&mut set, signal);
                nix::libc::sigprocmask(nix::libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                nix::libc::raise(signal);
            }
            // A signal whose default is not to end the process cannot have ended the
            // instance; said the shell's way all the same.
            std::process::exit(128 + signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_are_found_in_every_generation() {
        // A shell with a child and a grandchild (through a second shell).
        let mut shell = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & sh -c 'sleep 30 & wait' & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let root = shell.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found = descendants(root);
            let sleeps = found
                .iter()
                .filter(|process| {
                    std::fs::read_to_string(format!("/proc/{}/comm", process.pid))
                        .is_ok_and(|command| command.trim() == "sleep")
                })
                .count();
            if sleeps == 2 || Instant::now() >= deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = killpg(Pid::from_raw(root), Signal::SIGKILL);
        let _ = shell.wait();
        // The sleep, the inner shell and its sleep, each once; not the shell itself.
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found.iter().all(|process| process.pid != root));
        let inner = found
            .iter()
            .find(|process| found.iter().any(|other| other.parent == process.pid))
            .expect("the inner shell, parent of a sleep");
        assert_eq!(inner.parent, root);
    }
}
