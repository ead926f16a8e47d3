//! Entering network namespaces and running commands.
//!
//! Why setns instead of `ip netns exec`: `ip netns exec` also unshares the mount namespace and
//! remounts `/sys`, which hides bpffs pins under `/sys/fs/bpf` from the process. Commands and
//! threads started here only switch their *network* namespace (`setns(CLONE_NEWNET)`), so they keep
//! the host's mounts. The flip side: `/sys/class/net` inside such a process still shows the host's
//! interfaces — use `ip`/netlink, not sysfs, to look at the namespace's links.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use nix::sched::{setns, CloneFlags};

use crate::error::{Error, Result};

/// Where `ip netns add` keeps its bind mounts.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Opens the namespace file of `ns` (close-on-exec).
pub(crate) fn open_netns(ns: &str) -> Result<OwnedFd> {
    let path = Path::new(NETNS_DIR).join(ns);
    File::open(&path)
        .map(OwnedFd::from)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))
}

/// Moves the calling thread into `ns`. Only the network namespace changes.
pub(crate) fn enter_netns(ns: &str) -> Result<()> {
    let fd = open_netns(ns)?;
    setns(&fd, CloneFlags::CLONE_NEWNET).map_err(|e| Error::sys(format!("setns into {ns}"), e))
}

/// Makes `cmd` switch into `ns` between fork and exec.
pub(crate) fn command_in_netns(cmd: &mut Command, ns: &str) -> Result<()> {
    let fd = open_netns(ns)?;
    // SAFETY: the closure runs in the forked child before exec; it only calls setns(2), which is
    // async-signal-safe, and allocates nothing. `fd` is owned by the closure (so it stays open until
    // the Command is dropped) and is close-on-exec, so the new program does not inherit it.
    unsafe {
        cmd.pre_exec(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    Ok(())
}

/// Runs `f` on a new thread that has entered `ns`; returns its result, re-raising its panic.
pub(crate) fn run_in_netns<F, R>(ns: &str, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let fd = open_netns(ns)?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(scope, move || {
                setns(&fd, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::sys(format!("setns into {ns}"), e))?;
                drop(fd);
                Ok(f())
            })
            .map_err(|e| Error::io("spawn a thread", e))?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A readable command line for error messages.
pub(crate) fn display_command(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Builds a `Command` from an argument list whose first element is the program.
pub(crate) fn command_from_args<I, S>(args: I) -> Result<Command>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut args = args.into_iter();
    let program = args
        .next()
        .ok_or_else(|| Error::InvalidArgument("empty command line".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    Ok(cmd)
}

/// Runs `cmd` to completion, capturing its output (stdin is /dev/null). The command gets its own
/// process group, so a Ctrl-C at the terminal (meant for the test or `hypha demo`, which then
/// tears down) cannot kill an `ip link del` of that teardown half-way.
pub(crate) fn output(mut cmd: Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).process_group(0);
    cmd.output().map_err(|source| Error::Spawn {
        cmd: display_command(&cmd),
        source,
    })
}

/// Runs `cmd`; a non-zero exit is an [`Error::Command`]. Returns standard output.
pub(crate) fn output_ok(cmd: Command) -> Result<String> {
    let line = display_command(&cmd);
    let out = output(cmd)?;
    check(&line, out)
}

pub(crate) fn check(line: &str, out: Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            cmd: line.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs a command in the default namespace (the test process's own), e.g. `ip netns add`.
pub(crate) fn host_ok<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    output_ok(command_from_args(args)?)
}

/// Feeds `script` to `nft -f -` inside `ns`.
pub(crate) fn nft_script(ns: &str, script: &str) -> Result<()> {
    use std::io::Write;
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]);
    command_in_netns(&mut cmd, ns)?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let line = format!("nft -f - (in {ns}) <<{script}");
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        cmd: line.clone(),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| Error::io("write nft script", e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io("wait for nft", e))?;
    check(&line, out).map(drop)
}
