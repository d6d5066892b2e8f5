//! Runs a program confined, for judging it by its output: a scorer written to fool the
//! legality probes must not be able to see more than its input, remember anything from
//! one run to the next, or leave a process behind.
//!
//! The confined program
//! - reads only what it is given ([`Confinement::read`]: its own files, its inputs,
//!   the interpreter's installation) and the system's libraries, and writes only
//!   [`Confinement::write`] (its output directory and a private home);
//! - reaches no network, signals no process outside its sandbox, and keeps no state:
//!   its environment is exactly [`Confinement::env`], and what it may write is deleted
//!   by the caller after the run;
//! - dies with the run, its whole process tree included (grandchildren that `setsid`
//!   and double-fork too).
//!
//! How: a *launcher* (this same executable, re-entered through an environment variable,
//! see [`enter_launcher_if_requested`]) starts single-threaded, makes itself a child
//! subreaper, enters new user, PID, network and IPC namespaces where the system allows
//! unprivileged ones (the program is then PID 1 of its own namespace: when it exits, the
//! kernel kills everything it started; its network has only a loopback that is down),
//! confines itself with Landlock (filesystem rights, TCP, signals and abstract sockets
//! scoped to the sandbox), then starts the program and waits. On the program's exit or
//! on SIGTERM (the caller's timeout, or the caller's death) it kills what is left of the
//! tree and exits with the program's status. Where Landlock or the namespaces are
//! missing it goes on with what it has and says so ([`Isolation`]): a verdict reached
//! without a sandbox is reported as such, never silently.

mod launcher;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The environment variable that turns this executable into the launcher: the path of
/// the launch description it reads.
const LAUNCH_ENV: &str = "CACHEMONEY_SANDBOX_LAUNCH";

/// Exit status of a launcher that could not start the program (as `env(1)` does).
pub const COULD_NOT_START: i32 = 127;

/// What the confined program gets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Confinement {
    /// An absolute path.
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// The program's whole environment: nothing of the caller's leaks in.
    pub env: Vec<(String, String)>,
    /// Directories and files it may read and execute, beside the system's
    /// ([`SYSTEM_READ`]).
    pub read: Vec<PathBuf>,
    /// Directories it may write (create, remove, rename inside).
    pub write: Vec<PathBuf>,
    /// TCP on a network of its own whose only interface is a loopback that is up: for a
    /// program whose processes talk to each other (`torchrun`'s rendezvous, gloo). It
    /// still reaches nothing outside. Where no network namespace can be made, TCP is then
    /// open to every network, and [`Isolation::missing`] says so.
    #[serde(default)]
    pub loopback: bool,
}

/// What every program may read: the system's libraries and configuration, and the
/// kernel's views of itself. Not `/dev` (a root program could read a disk), not `/tmp`,
/// not `/home`.
pub const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/bin",
    "/sbin",
    "/etc",
    "/opt",
    "/proc",
    "/sys",
    "/nix/store",
];

/// Device files it may read and write: the harmless ones, and a GPU's.
pub const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
];

/// Device directories and name prefixes of GPUs (CUDA's `/dev/nvidia*`, DRM's render
/// nodes): read, write and ioctl.
pub const GPU_DEVICES: &[&str] = &["/dev/nvidia", "/dev/dri"];

/// What the launcher achieved on this machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Isolation {
    /// The Landlock ABI enforced (filesystem rights; TCP from 4; signals and abstract
    /// sockets from 6), or none.
    pub landlock: Option<u8>,
    /// Whether every right asked for is enforced (false: a best-effort subset).
    pub landlock_complete: bool,
    /// New user, mount, PID, network and IPC namespaces.
    pub namespaces: bool,
    /// Every mount read-only but the program's writable directories: no file it can
    /// read can carry state (extended attributes, dates, modes) to another run.
    #[serde(default)]
    pub read_only: bool,
    /// The kernel's keyrings refused (seccomp): they are not namespaced, and a key
    /// linked into the user's keyring outlives the run.
    #[serde(default)]
    pub no_keyrings: bool,
    /// No Unix sockets can be made (seccomp): a socket's path reaches the host's
    /// listeners whatever Landlock and the namespaces allow. Not for a program that asks
    /// for a loopback (its processes may talk over them).
    #[serde(default)]
    pub no_unix_sockets: bool,
    /// Why something is missing, in a few words each.
    pub missing: Vec<String>,
}

impl Isolation {
    /// Whether the program was confined to its files at all: without Landlock it could
    /// read the store and write anywhere its user may.
    pub fn confined(&self) -> bool {
        self.landlock.is_some()
    }

    /// One line: `Landlock ABI 6, user/mount/PID/network/IPC namespaces, read-only mounts,
    /// no keyrings`
    /// or what is missing.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match self.landlock {
            Some(abi) if self.landlock_complete => parts.push(format!("Landlock ABI {abi}")),
            Some(abi) => parts.push(format!("Landlock ABI {abi} (partly enforced)")),
            None => parts.push("no Landlock".to_string()),
        }
        parts.push(if self.namespaces {
            "user/mount/PID/network/IPC namespaces".to_string()
        } else {
            "no namespaces (TCP blocked by Landlock where it can; the tree killed by a subreaper)"
                .to_string()
        });
        if self.read_only {
            parts.push("read-only mounts".to_string());
        }
        if self.no_keyrings {
            parts.push("no keyrings".to_string());
        }
        if self.no_unix_sockets {
            parts.push("no Unix sockets".to_string());
        }
        let mut line = parts.join(", ");
        if !self.missing.is_empty() {
            line += &format!(" [{}]", self.missing.join("; "));
        }
        line
    }
}

/// A confined program running.
pub struct Running {
    launcher: Child,
    status_path: PathBuf,
}

/// How a confined run ended.
#[derive(Debug)]
pub enum Finished {
    /// The program exited (its status, as the launcher passed it on).
    Exited(ExitStatus),
    /// It ran past the deadline; it and everything it started were killed.
    TimedOut,
}

/// Starts `confinement` through the launcher. `control` is a directory of the caller's
/// that the program cannot read (the launch description and the launcher's report go
/// there). The standard streams are the program's.
pub fn spawn(
    confinement: &Confinement,
    control: &Path,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> io::Result<Running> {
    let launch_path = control.join("launch.json");
    let status_path = control.join("isolation.json");
    let launch = launcher::Launch {
        confinement: confinement.clone(),
        status: status_path.clone(),
    };
    std::fs::write(
        &launch_path,
        serde_json::to_vec(&launch).expect("launches serialise"),
    )?;
    let mut command = Command::new(std::env::current_exe()?);
    command
        .env_clear()
        .env(LAUNCH_ENV, &launch_path)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    {
        use std::os::unix::process::CommandExt;
        // Its own process group, so that a last-resort SIGKILL reaches the launcher and
        // the program even where the launcher could not make a PID namespace.
        command.process_group(0);
        // SAFETY: prctl is async-signal-safe, which is all pre_exec requires. SIGTERM,
        // not SIGKILL: the launcher kills the program's tree before it goes.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let launcher = command.spawn()?;
    Ok(Running {
        launcher,
        status_path,
    })
}

impl Running {
    /// The launcher's process id.
    pub fn id(&self) -> u32 {
        self.launcher.id()
    }

    /// The program's stdin, if [`spawn`] was given a pipe (taken once).
    pub fn stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.launcher.stdin.take()
    }

    /// The program's stdout, if [`spawn`] was given a pipe (taken once).
    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.launcher.stdout.take()
    }

    /// The program's stderr, if [`spawn`] was given a pipe (taken once).
    pub fn stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.launcher.stderr.take()
    }

    /// Waits for the program until `deadline`; past it, kills the program's whole tree.
    pub fn wait(&mut self, deadline: Instant) -> io::Result<Finished> {
        loop {
            if let Some(status) = self.launcher.try_wait()? {
                return Ok(Finished::Exited(status));
            }
            if Instant::now() >= deadline {
                self.terminate();
                return Ok(Finished::TimedOut);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the program and everything it started: SIGTERM to the launcher, which
    /// kills the tree and exits; its process group is killed if it has not within a
    /// few seconds.
    pub fn terminate(&mut self) {
        let pid = self.launcher.id() as i32;
        // SAFETY: kill(2) on a process we started and have not reaped; no memory touched.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let grace = Instant::now() + Duration::from_secs(5);
        while Instant::now() < grace {
            if let Ok(Some(_)) = self.launcher.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above, on the process group the launcher leads.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.launcher.wait();
    }

    /// What the launcher achieved, or why it could not say.
    pub fn isolation(&self) -> Result<Isolation, String> {
        let text = std::fs::read(&self.status_path).map_err(|e| {
            format!(
                "{}: the sandbox launcher left no report ({e})",
                self.status_path.display()
            )
        })?;
        serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not a sandbox report: {e}", self.status_path.display()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.launcher.try_wait() {
            self.terminate();
        }
    }
}

/// The Landlock ABI this kernel offers, or none (not built in, or not enabled at boot).
pub fn landlock_abi() -> Option<u8> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the documented query form: a null attribute, size 0, the version flag.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (abi > 0).then_some(abi as u8)
}

/// Call first thing in `main`: if this process was started as a sandbox launcher, it
/// runs the confined program and exits with its status; otherwise it returns at once.
pub fn enter_launcher_if_requested() {
    if let Some(path) = std::env::var_os(LAUNCH_ENV) {
        launcher::main(Path::new(&path));
    }
}
