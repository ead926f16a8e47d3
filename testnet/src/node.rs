//! A node: one network namespace with `lo` up, and the ways to run code inside it.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ns;
use crate::process::ProcHandle;
use crate::Shared;

/// A network namespace created by [`TestNet::add_node`](crate::TestNet::add_node). Cheap to clone;
/// the namespace lives until the `TestNet` is dropped (afterwards every method fails).
#[derive(Clone)]
pub struct Node {
    pub(crate) shared: Arc<Shared>,
    pub(crate) name: String,
    pub(crate) netns: String,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("netns", &self.netns)
            .finish()
    }
}

impl Node {
    /// The short name given to `add_node` (e.g. `"a"`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's name (for `ip -n NAME ...` or `ip netns exec NAME ...`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    fn alive(&self) -> Result<()> {
        if self.shared.is_torn_down() {
            Err(Error::InvalidArgument(format!(
                "node {} used after its TestNet was dropped",
                self.name
            )))
        } else {
            Ok(())
        }
    }

    /// Runs a command in the namespace and waits for it; returns its output whatever the exit
    /// status. `args[0]` is the program (looked up in `PATH`). There is no timeout: bound commands
    /// that could hang yourself (`ping -W`, `timeout 10 cmd`).
    ///
    /// ```no_run
    /// # fn f(node: &hypha_testnet::Node) -> hypha_testnet::Result<()> {
    /// let out = node.exec(["ping", "-c", "1", "-W", "1", "10.0.0.2"])?;
    /// assert!(out.status.success());
    /// # Ok(()) }
    /// ```
    pub fn exec<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.exec_command(ns::command_from_args(args)?)
    }

    /// Like [`exec`](Node::exec), but a non-zero exit is an [`Error::Command`] carrying stderr;
    /// returns stdout.
    pub fn exec_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let cmd = ns::command_from_args(args)?;
        let line = ns::display_command(&cmd);
        let out = self.exec_command(cmd)?;
        ns::check(&format!("{line} (in {})", self.netns), out)
    }

    /// Runs a prepared `Command` (with its env, cwd, …) in the namespace and waits for it.
    pub fn exec_command(&self, mut cmd: Command) -> Result<Output> {
        self.alive()?;
        ns::command_in_netns(&mut cmd, &self.netns)?;
        ns::output(cmd)
    }

    /// Starts a background process in the namespace. Its stdout and stderr go to
    /// `<TestNet::log_dir>/<name>.log`; stdin is /dev/null; it gets its own process group. The
    /// `TestNet` stops it at drop (SIGTERM, 2 s, SIGKILL) and, if the test is panicking, prints
    /// the tail of its log.
    ///
    /// ```no_run
    /// # fn f(node: &hypha_testnet::Node) -> hypha_testnet::Result<()> {
    /// let mut cmd = std::process::Command::new("/path/to/hypha");
    /// cmd.args(["--key-file", "/tmp/k.bin"]).env("RUST_LOG", "debug");
    /// let daemon = node.spawn("hypha-a", cmd)?;
    /// println!("pid {}", daemon.pid());
    /// # Ok(()) }
    /// ```
    pub fn spawn(&self, name: &str, mut cmd: Command) -> Result<ProcHandle> {
        self.alive()?;
        let log_path = self.shared.new_log_path(name)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(format!("create {}", log_path.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::io("duplicate log fd", e))?;
        ns::command_in_netns(&mut cmd, &self.netns)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0);
        let line = ns::display_command(&cmd);
        // Register under the lock so a concurrent teardown cannot miss the process.
        let mut state = self.shared.lock_state();
        if state.torn_down {
            return Err(Error::InvalidArgument(
                "spawn after the TestNet was dropped".into(),
            ));
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            cmd: format!("{line} (in {})", self.netns),
            source,
        })?;
        // The harness reaps by PID itself (waitid/waitpid); dropping `Child` neither waits nor kills.
        let handle = ProcHandle::new(
            name.to_string(),
            self.name.clone(),
            line,
            child.id(),
            log_path,
        );
        drop(child);
        state.procs.push(handle.clone());
        Ok(handle)
    }

    /// [`spawn`](Node::spawn) with an argument list instead of a `Command`.
    pub fn spawn_args<I, S>(&self, name: &str, args: I) -> Result<ProcHandle>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn(name, ns::command_from_args(args)?)
    }

    /// Runs `f` on a fresh thread that has entered this namespace (`setns(CLONE_NEWNET)`) and
    /// returns its result; a panic in `f` is re-raised here. Sockets created inside stay in the
    /// namespace and can be used from any thread afterwards. Mounts are the host's (bpffs pins
    /// under `/sys/fs/bpf` are visible, unlike under `ip netns exec`).
    ///
    /// ```no_run
    /// # fn f(node: &hypha_testnet::Node) -> Result<(), Box<dyn std::error::Error>> {
    /// // Outer `?`: entering the namespace; inner `?`: the closure's own result.
    /// let sock = node.run_in(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    /// # let _ = sock; Ok(()) }
    /// ```
    pub fn run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        self.alive()?;
        ns::run_in_netns(&self.netns, f)
    }

    /// Sets a sysctl inside the namespace (only `net.*` keys are per namespace),
    /// e.g. `node.sysctl("net.ipv4.ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec_ok(["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Turns on IPv4 and IPv6 forwarding, so the node routes between its links.
    pub fn enable_forwarding(&self) -> Result<()> {
        self.sysctl("net.ipv4.ip_forward", "1")?;
        self.sysctl("net.ipv6.conf.all.forwarding", "1")
    }
}
