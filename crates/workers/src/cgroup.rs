//! Per-instance resource limits through Linux control groups, as Lambda gives each
//! sandbox: a memory limit (an instance over it is killed by the kernel, reported as
//! out of memory), a process limit (Lambda's 1,024) and a CPU quota proportional to
//! memory (1,769 MB = one vCPU).
//!
//! Hosts differ, so the hierarchy is picked at start: cgroup v2 when its mount offers
//! the memory controller (`memory.max`, `pids.max`, `cpu.max`, `memory.events`,
//! `cgroup.kill`); else cgroup v1 controllers mounted separately (`memory`, `pids`,
//! `cpu`); else none, and instances are only process groups (said at start and in
//! `/v1/functions`). Instances live under `switchyard/<owner>/<instance>` of each
//! hierarchy, `<owner>` being the Switchyard process's mark: a Switchyard that stops
//! cleanly removes its `<owner>` directories, an instance's guard removes the
//! instance's (and tries its owner's) when Switchyard dies, and a Switchyard that
//! starts removes what a dead one still left.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// Lambda's process and thread limit per sandbox.
pub(crate) const PIDS_MAX: u64 = 1024;
/// Lambda's memory for one full vCPU.
const MB_PER_CPU: f64 = 1769.0;
const CPU_PERIOD_US: u64 = 100_000;

/// The limits of one instance.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) memory_mb: u32,
}

impl Limits {
    fn memory_bytes(self) -> u64 {
        u64::from(self.memory_mb) * 1024 * 1024
    }

    /// CPU time per period, proportional to memory (at least 1% of a CPU).
    fn cpu_quota_us(self) -> u64 {
        ((f64::from(self.memory_mb) / MB_PER_CPU * CPU_PERIOD_US as f64) as u64)
            .max(CPU_PERIOD_US / 100)
    }
}

#[derive(Debug)]
enum Hierarchy {
    /// `<mount>/switchyard/<owner>`, with memory (and pids and cpu where the host
    /// offers them) enabled for children.
    V2 {
        base: PathBuf,
        pids: bool,
        cpu: bool,
    },
    /// `<controller mount>/switchyard/<owner>` for each controller present.
    V1 {
        memory: PathBuf,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
    },
}

/// The cgroups instances are put in, if any.
#[derive(Debug)]
pub(crate) struct Cgroups {
    hierarchy: Option<Hierarchy>,
    /// How instances are isolated, for the log and `/v1/functions`.
    pub(crate) description: String,
}

/// How many [`Cgroups`] of this process use each `<owner>` directory: the last to
/// stop removes it.
static OWNER_DIRECTORY_USERS: std::sync::Mutex<std::collections::BTreeMap<PathBuf, usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Where the cgroup filesystems are mounted: (cgroup2 mount, v1 mounts by controller).
fn mounts() -> (Option<PathBuf>, Vec<(String, PathBuf)>) {
    let text = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut unified = None;
    let mut v1 = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 4 {
            continue;
        }
        match fields[2] {
            "cgroup2" => unified = Some(PathBuf::from(fields[1])),
            "cgroup" => {
                for option in fields[3].split(',') {
                    if matches!(option, "memory" | "pids" | "cpu") {
                        v1.push((option.to_owned(), PathBuf::from(fields[1])));
                    }
                }
            }
            _ => {}
        }
    }
    (unified, v1)
}

impl Cgroups {
    /// Picks and prepares a hierarchy for this process's instances (`owner` names its
    /// directory), removing the directories of owners that are gone.
    pub(crate) fn detect(owner: &str, owner_alive: impl Fn(&str) -> bool) -> Cgroups {
        // Under the lock that removing them takes: another user of the same
        // directories in this process (tests run several) stopping meanwhile does not
        // remove them from under this one.
        let mut users = OWNER_DIRECTORY_USERS
            .lock()
            .expect("owner directories lock");
        let cgroups = Self::pick(owner, owner_alive);
        for directory in cgroups.owner_directories() {
            *users.entry(directory.to_owned()).or_default() += 1;
        }
        cgroups
    }

    fn pick(owner: &str, owner_alive: impl Fn(&str) -> bool) -> Cgroups {
        let owner = owner.replace(':', "-");
        let (unified, v1) = mounts();
        let mut reasons = Vec::new();
        if let Some(mount) = unified {
            let controllers =
                std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|name| name == "memory") {
                match prepare_v2(&mount, &owner, &owner_alive) {
                    Ok(base) => {
                        // What the instances' parent really offers them.
                        let enabled = std::fs::read_to_string(base.join("cgroup.subtree_control"))
                            .unwrap_or_default();
                        let has =
                            |name: &str| enabled.split_whitespace().any(|offered| offered == name);
                        let (pids, cpu) = (has("pids"), has("cpu"));
                        let mut controllers = vec!["memory"];
                        if pids {
                            controllers.push("pids");
                        }
                        if cpu {
                            controllers.push("cpu");
                        }
                        return Cgroups {
                            description: format!("cgroup v2 ({})", controllers.join(", ")),
                            hierarchy: Some(Hierarchy::V2 { base, pids, cpu }),
                        };
                    }
                    Err(error) => {
                        reasons.push(format!("cgroup v2 at {}: {error}", mount.display()))
                    }
                }
            }
        }
        let mount_of = |name: &str| {
            v1.iter()
                .find(|(controller, _)| controller == name)
                .map(|(_, mount)| mount.clone())
        };
        if let Some(memory_mount) = mount_of("memory") {
            let prepare = |mount: PathBuf| -> std::io::Result<PathBuf> {
                let root = mount.join("switchyard");
                std::fs::create_dir_all(&root)?;
                remove_dead_owners(&root, &owner_alive);
                let base = root.join(&owner);
                std::fs::create_dir_all(&base)?;
                Ok(base)
            };
            match prepare(memory_mount.clone()) {
                Ok(memory) => {
                    let pids = mount_of("pids").and_then(|mount| prepare(mount).ok());
                    let cpu = mount_of("cpu").and_then(|mount| prepare(mount).ok());
                    let mut controllers = vec!["memory"];
                    if pids.is_some() {
                        controllers.push("pids");
                    }
                    if cpu.is_some() {
                        controllers.push("cpu");
                    }
                    return Cgroups {
                        description: format!("cgroup v1 ({})", controllers.join(", ")),
                        hierarchy: Some(Hierarchy::V1 { memory, pids, cpu }),
                    };
                }
                Err(error) => reasons.push(format!(
                    "cgroup v1 memory at {}: {error}",
                    memory_mount.display()
                )),
            }
        }
        if reasons.is_empty() {
            reasons.push("no cgroup hierarchy with the memory controller is mounted".to_owned());
        }
        Cgroups {
            hierarchy: None,
            description: format!(
                "process-group (no memory, pids or cpu limits: {})",
                reasons.join("; ")
            ),
        }
    }

    /// No cgroups, for `reason`.
    pub(crate) fn off(reason: &str) -> Cgroups {
        Cgroups {
            hierarchy: None,
            description: format!("process-group (no memory, pids or cpu limits: {reason})"),
        }
    }

    /// Whether instances get limits.
    pub(crate) fn limited(&self) -> bool {
        self.hierarchy.is_some()
    }

    /// Removes this process's `<owner>` directories, once its instances' cgroups are
    /// gone (at a clean stop), unless something else in this process still uses them.
    /// One that still holds an instance's cgroup is left, and said, for the next
    /// Switchyard to start.
    pub(crate) fn remove_owner(&self) {
        let mut users = OWNER_DIRECTORY_USERS
            .lock()
            .expect("owner directories lock");
        for directory in self.owner_directories() {
            let Some(count) = users.get_mut(directory) else {
                continue;
            };
            *count -= 1;
            if *count > 0 {
                continue;
            }
            users.remove(directory);
            match std::fs::remove_dir(directory) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(directory = %directory.display(), %error, "removing this process's cgroup directory failed")
                }
            }
        }
    }

    /// The `<owner>` directories instances' cgroups are made in.
    fn owner_directories(&self) -> Vec<&Path> {
        match &self.hierarchy {
            None => Vec::new(),
            Some(Hierarchy::V2 { base, .. }) => vec![base.as_path()],
            Some(Hierarchy::V1 { memory, pids, cpu }) => {
                [Some(memory), pids.as_ref(), cpu.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(PathBuf::as_path)
                    .collect()
            }
        }
    }

    /// Creates the cgroup of one instance with its limits; `None` without cgroups.
    pub(crate) fn create(
        &self,
        instance: &str,
        limits: Limits,
    ) -> std::io::Result<Option<InstanceCgroup>> {
        let Some(hierarchy) = &self.hierarchy else {
            return Ok(None);
        };
        let mut cgroup = InstanceCgroup {
            v2: matches!(hierarchy, Hierarchy::V2 { .. }),
            directories: Vec::new(),
            procs: Vec::new(),
            memory: PathBuf::new(),
        };
        match Self::fill(hierarchy, instance, limits, &mut cgroup) {
            Ok(()) => Ok(Some(cgroup)),
            Err(error) => {
                // Nothing half-made left behind.
                cgroup.kill_and_remove();
                Err(error)
            }
        }
    }

    /// Creates the instance's directories in `hierarchy` and writes its limits.
    fn fill(
        hierarchy: &Hierarchy,
        instance: &str,
        limits: Limits,
        cgroup: &mut InstanceCgroup,
    ) -> std::io::Result<()> {
        let mut make = |base: &Path| -> std::io::Result<PathBuf> {
            let directory = base.join(instance);
            std::fs::create_dir(&directory)?;
            cgroup.directories.push(directory.clone());
            cgroup.procs.push(
                CString::new(
                    directory
                        .join("cgroup.procs")
                        .into_os_string()
                        .into_encoded_bytes(),
                )
                .map_err(std::io::Error::other)?,
            );
            Ok(directory)
        };
        match hierarchy {
            Hierarchy::V2 { base, pids, cpu } => {
                let directory = make(base)?;
                write(&directory.join("memory.max"), limits.memory_bytes())?;
                // No swap: over the limit is over the limit, as on Lambda.
                let _ = write(&directory.join("memory.swap.max"), 0);
                if *pids {
                    write(&directory.join("pids.max"), PIDS_MAX)?;
                }
                if *cpu {
                    std::fs::write(
                        directory.join("cpu.max"),
                        format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us()),
                    )?;
                }
                cgroup.memory = directory;
            }
            Hierarchy::V1 { memory, pids, cpu } => {
                let directory = make(memory)?;
                write(
                    &directory.join("memory.limit_in_bytes"),
                    limits.memory_bytes(),
                )?;
                // Swap counts against the same limit where the kernel accounts it.
                let _ = write(
                    &directory.join("memory.memsw.limit_in_bytes"),
                    limits.memory_bytes(),
                );
                cgroup.memory = directory;
                if let Some(pids) = pids {
                    let directory = make(pids)?;
                    write(&directory.join("pids.max"), PIDS_MAX)?;
                }
                if let Some(cpu) = cpu {
                    let directory = make(cpu)?;
                    write(&directory.join("cpu.cfs_period_us"), CPU_PERIOD_US)?;
                    write(&directory.join("cpu.cfs_quota_us"), limits.cpu_quota_us())?;
                }
            }
        }
        Ok(())
    }
}

fn write(path: &Path, value: u64) -> std::io::Result<()> {
    std::fs::write(path, value.to_string())
}

/// Creates `<mount>/switchyard/<owner>` and enables memory, pids and cpu for its
/// children (which needs them enabled on the way down from the mount).
fn prepare_v2(
    mount: &Path,
    owner: &str,
    owner_alive: &impl Fn(&str) -> bool,
) -> std::io::Result<PathBuf> {
    let root = mount.join("switchyard");
    std::fs::create_dir_all(&root)?;
    remove_dead_owners(&root, owner_alive);
    let base = root.join(owner);
    std::fs::create_dir_all(&base)?;
    // Controllers one at a time: memory is required, pids and cpu are taken where
    // offered. (Inside a cgroup namespace whose root holds Switchyard itself, the
    // kernel refuses: there are then no limits, and the reason says so.)
    for directory in [mount, root.as_path(), base.as_path()] {
        let control = directory.join("cgroup.subtree_control");
        std::fs::write(&control, "+memory").map_err(|error| {
            std::io::Error::new(
                error.kind(),
                format!("enabling memory in {}: {error}", control.display()),
            )
        })?;
        for optional in ["+pids", "+cpu"] {
            let _ = std::fs::write(&control, optional);
        }
    }
    Ok(base)
}

/// Kills what is left in the cgroups of owners that are gone and removes them.
fn remove_dead_owners(root: &Path, owner_alive: &impl Fn(&str) -> bool) {
    let Ok(owners) = std::fs::read_dir(root) else {
        return;
    };
    for owner in owners.flatten() {
        // Marks are numbers and `:`, stored with `-` for `:`.
        let name = owner.file_name().to_string_lossy().replace('-', ":");
        if !owner.path().is_dir() || owner_alive(&name) {
            continue;
        }
        if let Ok(instances) = std::fs::read_dir(owner.path()) {
            for instance in instances.flatten() {
                if instance.path().is_dir() {
                    kill_members(&instance.path());
                    let _ = std::fs::remove_dir(instance.path());
                }
            }
        }
        let _ = std::fs::remove_dir(owner.path());
    }
}

/// SIGKILLs every process in a cgroup directory, a few rounds (a fork in flight can
/// add one).
fn kill_members(directory: &Path) {
    for _ in 0..10 {
        let members = std::fs::read_to_string(directory.join("cgroup.procs")).unwrap_or_default();
        // 0 stands for a process outside our pid namespace: never `kill(0)` (our own
        // process group).
        let pids: Vec<i32> = members
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .filter(|pid| *pid > 0)
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// One instance's cgroups (one per controller in v1). Handed to the instance's guard
/// (serialized), which joins the instance to them and kills and removes them if
/// Switchyard dies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InstanceCgroup {
    v2: bool,
    directories: Vec<PathBuf>,
    /// The `cgroup.procs` files the instance's process joins before it runs.
    procs: Vec<CString>,
    /// The directory with the memory controller's files.
    memory: PathBuf,
}

impl InstanceCgroup {
    /// The file with the most memory the instance's processes used together, in
    /// bytes (`memory.peak` in v2, `memory.max_usage_in_bytes` in v1).
    pub(crate) fn peak_file(&self) -> PathBuf {
        self.memory.join(if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        })
    }

    /// Moves the calling process into the instance's cgroups. Called in the forked
    /// child before exec: only async-signal-safe calls (open, write, close), on paths
    /// prepared before the fork.
    pub(crate) fn join_from_child(&self) -> std::io::Result<()> {
        for path in &self.procs {
            // SAFETY: `path` is a valid NUL-terminated string; open/write/close are
            // async-signal-safe.
            unsafe {
                let fd = nix::libc::open(path.as_ptr(), nix::libc::O_WRONLY | nix::libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let written = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                nix::libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer killed a process of the instance.
    pub(crate) fn oom_killed(&self) -> bool {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.memory.join(file))
            .unwrap_or_default()
            .lines()
            .any(|line| {
                line.strip_prefix("oom_kill ")
                    .and_then(|count| count.trim().parse::<u64>().ok())
                    .is_some_and(|count| count > 0)
            })
    }

    /// Kills everything in the instance's cgroups (processes that left its process
    /// group included) and removes them.
    pub(crate) fn kill_and_remove(&self) {
        self.kill();
        self.remove();
    }

    /// SIGKILLs everything in the instance's cgroups.
    pub(crate) fn kill(&self) {
        if self.v2 && !self.memory.as_os_str().is_empty() {
            let _ = std::fs::write(self.memory.join("cgroup.kill"), "1");
        }
        for directory in &self.directories {
            kill_members(directory);
        }
    }

    /// Removes the instance's (emptied) cgroups, then the `<owner>` directories above
    /// them if nothing else is left in them: after Switchyard died, the last guard to
    /// clean up removes them.
    pub(crate) fn remove_with_owner(&self) {
        self.remove();
        for directory in &self.directories {
            if let Some(owner) = directory.parent() {
                let _ = std::fs::remove_dir(owner);
            }
        }
    }

    /// Removes the instance's (emptied) cgroups.
    fn remove(&self) {
        for directory in &self.directories {
            // Emptying is asynchronous: a few tries.
            for _ in 0..20 {
                match std::fs::remove_dir(directory) {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_proportional_to_memory_as_on_lambda() {
        assert_eq!(Limits { memory_mb: 1769 }.cpu_quota_us(), 100_000);
        assert_eq!(Limits { memory_mb: 3538 }.cpu_quota_us(), 200_000);
        assert_eq!(Limits { memory_mb: 128 }.cpu_quota_us(), 7_235);
        assert_eq!(Limits { memory_mb: 128 }.memory_bytes(), 134_217_728);
    }

    /// A clean stop removes the owner's directory when it is the last user of it in
    /// the process, unless an instance's cgroup is still in it (plain directories
    /// standing in for a v2 hierarchy).
    #[test]
    fn the_owner_directory_is_removed_by_its_last_user_once_it_is_empty() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("owner");
        std::fs::create_dir(&base).unwrap();
        let cgroups = Cgroups {
            hierarchy: Some(Hierarchy::V2 {
                base: base.clone(),
                pids: false,
                cpu: false,
            }),
            description: "cgroup v2 (memory)".to_owned(),
        };
        // Two users in this process, as `detect` counts them.
        let users = |count: usize| {
            OWNER_DIRECTORY_USERS
                .lock()
                .unwrap()
                .insert(base.clone(), count);
        };
        users(2);
        cgroups.remove_owner();
        assert!(base.exists(), "removed while another user runs");
        std::fs::create_dir(base.join("thumbs-1")).unwrap();
        cgroups.remove_owner();
        assert!(base.exists(), "removed with an instance's cgroup in it");
        std::fs::remove_dir(base.join("thumbs-1")).unwrap();
        users(1);
        cgroups.remove_owner();
        assert!(!base.exists());
        // Not counted (gone already): nothing to do, nothing said.
        cgroups.remove_owner();
    }

    /// The files a v2 instance cgroup gets, written into a plain directory laid out as
    /// a v2 hierarchy (this host mounts v1 controllers; the kernel's side of v2 is not
    /// exercised here).
    #[test]
    fn a_v2_instance_gets_lambda_limits_in_the_v2_files() {
        let base = tempfile::tempdir().unwrap();
        let cgroups = Cgroups {
            hierarchy: Some(Hierarchy::V2 {
                base: base.path().to_owned(),
                pids: true,
                cpu: true,
            }),
            description: "cgroup v2 (memory, pids, cpu)".to_owned(),
        };
        let cgroup = cgroups
            .create("thumbs-1", Limits { memory_mb: 256 })
            .unwrap()
            .unwrap();
        let read =
            |file: &str| std::fs::read_to_string(base.path().join("thumbs-1").join(file)).unwrap();
        assert_eq!(read("memory.max"), "268435456");
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "1024");
        assert_eq!(read("cpu.max"), "14471 100000");
        assert!(!cgroup.oom_killed());
        std::fs::write(
            base.path().join("thumbs-1/memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert!(cgroup.oom_killed());
        // A host whose v2 tree offers memory only: no pids or cpu files are written.
        let lean = Cgroups {
            hierarchy: Some(Hierarchy::V2 {
                base: base.path().to_owned(),
                pids: false,
                cpu: false,
            }),
            description: "cgroup v2 (memory)".to_owned(),
        };
        lean.create("thumbs-2", Limits { memory_mb: 128 })
            .unwrap()
            .unwrap();
        assert!(base.path().join("thumbs-2/memory.max").exists());
        assert!(!base.path().join("thumbs-2/pids.max").exists());
        assert!(!base.path().join("thumbs-2/cpu.max").exists());
        assert_eq!(
            cgroup.procs,
            vec![
                CString::new(
                    base.path()
                        .join("thumbs-1/cgroup.procs")
                        .into_os_string()
                        .into_encoded_bytes()
                )
                .unwrap()
            ]
        );
    }
}
