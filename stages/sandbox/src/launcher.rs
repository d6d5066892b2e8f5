//! The launcher: this executable re-entered to confine one program (see the crate's
//! documentation for the why). It runs before anything else in `main`, so it is
//! single-threaded when it enters its namespaces, which the kernel requires.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use serde::{Deserialize, Serialize};

use crate::{Confinement, Isolation, COULD_NOT_START, DEVICES, GPU_DEVICES, SYSTEM_READ};

/// What the caller hands the launcher.
#[derive(Serialize, Deserialize)]
pub(crate) struct Launch {
    pub confinement: Confinement,
    /// Where the launcher reports its [`Isolation`] (a caller's file, out of the
    /// program's reach).
    pub status: PathBuf,
}

/// The newest Landlock ABI whose rights have been checked here: the crate enforces
/// what the kernel has of it.
const LANDLOCK_ABI: ABI = ABI::V6;

pub(crate) fn main(path: &Path) -> ! {
    let Some(launch) = std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Launch>(&bytes).ok())
    else {
        eprintln!(
            "cachemoney sandbox: cannot read the launch description {}",
            path.display()
        );
        std::process::exit(COULD_NOT_START);
    };
    let mut isolation = Isolation::default();
    // Orphans of the program (a double fork) come back to us, to be killed.
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
    }
    // Opened before Landlock closes the way to it, and before the filesystem is made
    // read-only (a mount with a file open for writing cannot be); written after.
    let report = File::create(&launch.status);
    match enter_namespaces() {
        Ok(()) => {
            isolation.namespaces = true;
            if launch.confinement.loopback {
                if let Err(why) = loopback_up() {
                    isolation.missing.push(why);
                }
            }
            match read_only_except(&launch.confinement.write) {
                Ok(()) => isolation.read_only = true,
                Err(why) => isolation.missing.push(why),
            }
        }
        Err(why) => {
            isolation.missing.push(why);
            if launch.confinement.loopback {
                isolation
                    .missing
                    .push("TCP open to every network: loopback asked for, and no network namespace to keep it there".into());
            }
        }
    }
    let terminate = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, terminate.clone());
    match confine(&launch.confinement) {
        Ok((abi, complete)) => {
            isolation.landlock = Some(abi);
            isolation.landlock_complete = complete;
        }
        Err(why) => isolation.missing.push(why),
    }
    // Last: the filter is inherited by the program, and nothing after needs a keyring
    // or a socket.
    let unix_sockets = launch.confinement.loopback;
    match refuse_keyrings_and_sockets(!unix_sockets) {
        Ok(()) => {
            isolation.no_keyrings = true;
            isolation.no_unix_sockets = !unix_sockets;
        }
        Err(why) => isolation.missing.push(why),
    }
    match report {
        Ok(mut file) => {
            let _ = file.write_all(&serde_json::to_vec(&isolation).expect("serialises"));
        }
        Err(e) => {
            eprintln!(
                "cachemoney sandbox: cannot write {}: {e}",
                launch.status.display()
            );
            std::process::exit(COULD_NOT_START);
        }
    }
    let code = run(&launch.confinement, &terminate);
    kill_descendants();
    std::process::exit(code)
}

/// `cachestat(2)` (Linux 6.5), which the libc crate does not name on x86-64 yet: the
/// same number on every architecture.
const SYS_CACHESTAT: i64 = 451;

/// A seccomp filter that fails, with EPERM, the calls that reach state the namespaces do
/// not separate, and lets everything else through. Keyrings are global to the kernel:
/// the third red team linked a key holding the whole val stream into the user's
/// keyring, where every later run read it back (BPB 0.06, every probe passed).
fn refuse_keyrings_and_sockets(no_unix_sockets: bool) -> Result<(), String> {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("no seccomp filter for this architecture ({e})"))?;
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        // io_uring makes sockets (IORING_OP_SOCKET) and opens files without the system
        // calls a filter can see: the eighth red team made a Unix socket that way and
        // reached a listener on the host. `mincore` and `cachestat` read which pages of
        // a file the host's page cache holds, which any run can set by reading them and
        // clear with `posix_fadvise`: the ninth red team carried kilobytes from one run
        // to the next through the pages of a large library. No program here needs them.
        [
            libc::SYS_add_key,
            libc::SYS_keyctl,
            libc::SYS_request_key,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_mincore,
            SYS_CACHESTAT,
        ]
        .into_iter()
            .map(|call| (call, Vec::new()))
            .collect();
    if no_unix_sockets {
        // Connecting to a Unix socket by its path needs no Landlock right (ABI 6 and
        // before), and namespaces do not hide the host's sockets: the fourth red team
        // reached a listener of its own in /tmp. `socketpair` stays allowed (pipes
        // between a program's own processes); abstract sockets are scoped by Landlock.
        let unix = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )
        .map_err(|e| format!("seccomp: {e}"))?;
        let rule = SeccompRule::new(vec![unix]).map_err(|e| format!("seccomp: {e}"))?;
        rules.insert(libc::SYS_socket, vec![rule]);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    let program: BpfProgram = filter.try_into().map_err(|e| format!("seccomp: {e:?}"))?;
    seccompiler::apply_filter(&program).map_err(|e| format!("seccomp: {e}"))
}

/// New user, PID, network and IPC namespaces, with this user's ids mapped to
/// themselves. The next process started is PID 1 of the new PID namespace.
fn enter_namespaces() -> Result<(), String> {
    // SAFETY: plain system calls with integer arguments.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC;
    // SAFETY: as above; we are single-threaded, which CLONE_NEWUSER requires.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(format!(
            "no unprivileged namespaces here ({})",
            std::io::Error::last_os_error()
        ));
    }
    let write = |file: &str, text: String| std::fs::write(file, text);
    let _ = write("/proc/self/setgroups", "deny".into());
    let _ = write("/proc/self/uid_map", format!("{uid} {uid} 1\n"));
    let _ = write("/proc/self/gid_map", format!("{gid} {gid} 1\n"));
    Ok(())
}

/// Brings up `lo`, the only interface of the new network namespace (it starts down), so
/// that the program's processes can reach each other over TCP on 127.0.0.1.
fn loopback_up() -> Result<(), String> {
    let fail = |what: &str| format!("no loopback ({what}: {})", std::io::Error::last_os_error());
    // SAFETY: socket(2) with integer arguments; the descriptor is closed below.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if socket < 0 {
        return Err(fail("socket"));
    }
    // SAFETY: an all-zero ifreq is valid; the name is NUL-terminated within its array.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *to = *from as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    let result = unsafe {
        if libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request) != 0 {
            Err(fail("SIOCGIFFLAGS"))
        } else {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(socket, libc::SIOCSIFFLAGS, &request) != 0 {
                Err(fail("SIOCSIFFLAGS"))
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: our descriptor.
    unsafe {
        libc::close(socket);
    }
    result
}

/// Every mount of this (private) mount namespace read-only, but `writable`, each bound
/// onto itself first. Landlock decides which files may be opened, not whether a file
/// the program may read can have its extended attributes, dates or mode changed: on a
/// read-only mount none can, so nothing the program can read carries state to the next
/// run (the red team kept a whole stream in a virtual environment's xattrs).
fn read_only_except(writable: &[PathBuf]) -> Result<(), String> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |path: &Path| CString::new(path.as_os_str().as_bytes()).expect("no NUL in paths");
    let fail = |what: &str| {
        format!(
            "no read-only mounts ({what}: {}): file metadata may carry state between runs",
            std::io::Error::last_os_error()
        )
    };
    let root = c(Path::new("/"));
    // SAFETY: mount(2) with valid C strings and null data; we own this mount namespace.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(fail("private mounts"));
    }
    for dir in writable {
        let dir = c(dir);
        // SAFETY: as above.
        if unsafe {
            libc::mount(
                dir.as_ptr(),
                dir.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(fail("a bind mount of a writable directory"));
        }
    }
    set_read_only(&root, true, true).map_err(|_| fail("mount_setattr"))?;
    for dir in writable {
        set_read_only(&c(dir), false, true).map_err(|_| fail("mount_setattr"))?;
    }
    Ok(())
}

/// mount_setattr(2) (Linux 5.12): sets or clears MOUNT_ATTR_RDONLY on the mount at
/// `path`, and on every mount below it when `recursive`.
fn set_read_only(path: &std::ffi::CStr, read_only: bool, recursive: bool) -> Result<(), ()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let attr = MountAttr {
        attr_set: if read_only { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: if read_only { 0 } else { MOUNT_ATTR_RDONLY },
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: the syscall reads `attr` (its size given) and a valid C string.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// Landlock on this process (and so the program): the filesystem rights of
/// `confinement`, no TCP, no signals or abstract sockets beyond the sandbox.
fn confine(confinement: &Confinement) -> Result<(u8, bool), String> {
    let abi = LANDLOCK_ABI;
    let all = AccessFs::from_all(abi);
    let read = AccessFs::from_read(abi);
    // No device, pipe or socket nodes: an output that is a FIFO would hang its reader.
    let write = all & !(AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::MakeFifo);
    let device = AccessFs::from_file(abi);
    let fail = |e: landlock::RulesetError| format!("Landlock: {e}");
    let ruleset = Ruleset::default().handle_access(all).map_err(fail)?;
    // A loopback program's TCP stays on its own network (see `loopback_up`).
    let ruleset = if confinement.loopback {
        ruleset
    } else {
        ruleset
            .handle_access(AccessNet::from_all(ABI::V4))
            .map_err(fail)?
    };
    let ruleset = ruleset
        .scope(Scope::from_all(abi))
        .map_err(fail)?
        .create()
        .map_err(fail)?;
    let mut rules: Vec<PathBeneath<PathFd>> = Vec::new();
    let mut allow = |path: &Path, access: BitFlags<AccessFs>| {
        // A path that is not there grants nothing.
        if let Ok(fd) = PathFd::new(path) {
            let access = if path.is_dir() {
                access
            } else {
                access & AccessFs::from_file(abi)
            };
            rules.push(PathBeneath::new(fd, access));
        }
    };
    let read_paths = SYSTEM_READ
        .iter()
        .map(Path::new)
        .chain(confinement.read.iter().map(PathBuf::as_path));
    for path in read_paths {
        allow(path, read);
    }
    for path in &confinement.write {
        allow(path, write);
    }
    for path in DEVICES.iter().map(PathBuf::from).chain(gpu_devices()) {
        allow(&path, device);
    }
    let ruleset = ruleset
        .add_rules(rules.into_iter().map(Ok::<_, landlock::RulesetError>))
        .map_err(fail)?;
    let status = ruleset.restrict_self().map_err(fail)?;
    let effective = ABI::from(status.landlock) as i32 as u8;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok((effective, true)),
        RulesetStatus::PartiallyEnforced => Ok((effective, false)),
        RulesetStatus::NotEnforced => Err("no Landlock in this kernel".into()),
    }
}

/// `/dev/nvidia*` and `/dev/dri`, where they exist.
fn gpu_devices() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for prefix in GPU_DEVICES {
        let prefix = Path::new(prefix);
        let (Some(dir), Some(stem)) = (prefix.parent(), prefix.file_name()) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&*stem.to_string_lossy())
            {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Starts the program and waits for it, or kills it on SIGTERM. Returns the exit code
/// to pass on (128 + signal for a killed program, as a shell says it).
fn run(confinement: &Confinement, terminate: &AtomicBool) -> i32 {
    let mut command = Command::new(&confinement.program);
    command
        .args(&confinement.args)
        .env_clear()
        .envs(confinement.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&confinement.cwd);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe. The program (PID 1 of its namespace when
        // there is one) dies with the launcher, and its namespace with it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "cachemoney sandbox: cannot start {}: {e}",
                confinement.program.display()
            );
            return COULD_NOT_START;
        }
    };
    loop {
        if terminate.load(Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            return 128 + libc::SIGTERM;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                return status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(libc::SIGKILL));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return COULD_NOT_START,
        }
    }
}

/// Kills whatever the program left: its orphans were re-parented to us (we are their
/// subreaper), each killed and reaped, until none is left. In a PID namespace the
/// kernel has done it already when its first process exited.
fn kill_descendants() {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    for _ in 0..10_000 {
        let children = children_of(me);
        if children.is_empty() {
            return;
        }
        for pid in children {
            // SAFETY: kill(2) on a process that is our child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        // SAFETY: waitpid with a null status pointer, non-blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The processes whose parent is `parent`, from `/proc`.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // The command name is in parentheses and may hold spaces: the fields
                    // after the last ')' are state, then the parent's pid.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
