//! One QEMU virtual machine booting the test image, driven over SSH.

use std::fmt::Display;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::rc::Rc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::console::{tail_lines, Console};
use crate::image::TestImage;
use crate::monitor::Monitor;
use crate::net::{is_hostfwd_collision, pick_free_port};
use crate::process::{kill_and_reap, run_with_timeout, wait_until};
use crate::seed::{harness_user_data, FwCfg};
use crate::ssh::Ssh;

/// How long [`Vm::wait_ssh`] callers should wait for a boot: TCG boots take
/// 30-60 s, a boot that burns a failed try up to ~110 s more.
pub const DEFAULT_SSH_TIMEOUT: Duration = Duration::from_secs(240);
/// A single command over SSH; generous because TCG is slow.
const SSH_COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// Console lines quoted in every failure.
const FAILURE_TAIL_LINES: usize = 60;
const QEMU_START_TIMEOUT: Duration = Duration::from_secs(30);
/// A clean power-off under TCG: stopping units, unmounting, syncing.
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(120);
const PORT_ATTEMPTS: usize = 5;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// VMs run one at a time: the machines have two cores, and two TCG guests
/// at once make both slow enough to hit timeouts.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How to boot a [`Vm`].
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// Size of the virtual disk in bytes; the image's own size if `None`.
    /// Larger lets a test watch the data partition grow.
    pub disk_size: Option<u64>,
    /// Guest memory in MiB; 1536 if `None`.
    pub memory_mib: Option<u32>,
    /// Virtual CPUs; 2 if `None`. Several TCG guests with two vCPUs each on
    /// a two-core machine starve each other's timers (RCU stalls, hung
    /// boots): give them one each.
    pub cpus: Option<u32>,
    /// More QEMU arguments, e.g. `-fw_cfg` for user data.
    pub extra_args: Vec<String>,
    /// Guest-initiated forwards added to the user network (which is
    /// `restrict=on`), as QEMU spells them:
    /// `tcp:10.0.2.100:80-tcp:127.0.0.1:8080` lets the guest reach a host
    /// server at 10.0.2.100:80.
    pub guest_forwards: Vec<String>,
    /// Guest TCP ports reachable from the host: each gets a host port on
    /// 127.0.0.1 picked at start ([`Vm::host_port`]).
    pub host_forwards: Vec<u16>,
    /// The test gives the guest its own user data in `extra_args` (a seed,
    /// fw_cfg files, or none at all). Otherwise the harness adds fw_cfg user
    /// data that gives root the fixture SSH key: the test image bakes no
    /// key, so that is how the tests log in, as a user provisions a host.
    /// A test that brings its own must give root the key itself
    /// ([`crate::root_fixture_key`]) if it wants to log in.
    pub own_user_data: bool,
    /// The devices the guest sees: virtio by default.
    pub shape: MachineShape,
}

/// The virtual hardware of a [`Vm`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MachineShape {
    /// A cloud VM: virtio disk, NIC and entropy source.
    #[default]
    Virtio,
    /// A PC with no virtio at all: the disk on q35's built-in AHCI (SATA)
    /// controller, an Intel e1000e NIC, no hardware entropy source. What
    /// the metal image's drivers must find.
    Metal,
}

/// A running (or powered-off) VM. Its disk overlay and UEFI variables live
/// in a temporary directory and persist across guest reboots and across
/// [`Vm::power_off_hard`] / [`Vm::power_on`]. Dropping it kills QEMU and
/// removes the directory (`BALLAST_KEEP_VMS=1` keeps it).
///
/// Only one `Vm` exists at a time per test process: [`Vm::boot`] waits for
/// the previous one to be dropped. A test must not hold two.
pub struct Vm {
    dir: Option<TempDir>,
    dir_path: PathBuf,
    console: Console,
    opts: VmOptions,
    ssh: Ssh,
    qemu: Mutex<Option<Child>>,
    monitor: Mutex<Option<Monitor>>,
    /// The harness's user data (see [`VmOptions::own_user_data`]); QEMU
    /// reads its files at every power-on.
    harness_user_data: Option<FwCfg>,
    /// Notices firmware stuck after a guest reset (see `unstick_firmware`).
    reset_watch: Mutex<ResetWatch>,
    /// (host port, guest port) of [`VmOptions::host_forwards`], as picked
    /// at the last start.
    forwards: Vec<(u16, u16)>,
    /// Shared by the VMs of one [`Vm::boot_several`].
    _one_at_a_time: Rc<MutexGuard<'static, ()>>,
}

impl Vm {
    /// Creates the VM's disk overlay and firmware variables and starts QEMU.
    /// Returns once QEMU runs; the guest is still booting (see
    /// [`Vm::wait_ssh`]). Panics on failure.
    pub fn boot(opts: VmOptions) -> Vm {
        Self::boot_disk(&TestImage::get().qcow2_path(), opts)
    }

    /// As [`Vm::boot`], on an overlay of any qcow2 image (absolute path)
    /// instead of the test image.
    pub fn boot_disk(backing: &Path, opts: VmOptions) -> Vm {
        // A test that panicked while holding the lock poisons it; the VM it
        // held is gone all the same.
        let guard = Rc::new(lock(&ONE_VM_AT_A_TIME));
        match Self::try_boot(backing, opts, guard) {
            Ok(vm) => vm,
            Err(e) => panic!("booting the test VM failed: {e:#}"),
        }
    }

    /// Boots `n` VMs of the test image, each with `opts` and a disk, port
    /// and console of its own: a small fleet. The only way to hold more than
    /// one `Vm`. They boot one after another, each started once the one
    /// before accepts SSH (`boot_timeout` each): booting all at once under
    /// TCG on two cores stalls them.
    pub fn boot_several(n: usize, opts: VmOptions, boot_timeout: Duration) -> Vec<Vm> {
        let guard = Rc::new(lock(&ONE_VM_AT_A_TIME));
        let backing = TestImage::get().qcow2_path();
        let mut vms = Vec::with_capacity(n);
        for i in 0..n {
            match Self::try_boot(&backing, opts.clone(), Rc::clone(&guard)) {
                Ok(vm) => {
                    vm.wait_ssh(boot_timeout);
                    vms.push(vm);
                }
                Err(e) => panic!("booting test VM {i} of {n} failed: {e:#}"),
            }
        }
        vms
    }

    fn try_boot(backing: &Path, opts: VmOptions, guard: Rc<MutexGuard<'static, ()>>) -> Result<Vm> {
        let dir = tempfile::Builder::new()
            .prefix("ballast-vm-")
            .tempdir()
            .context("creating VM directory")?;
        let dir_path = dir.path().to_path_buf();
        create_overlay(backing, &dir_path.join("disk.qcow2"), opts.disk_size)?;
        let vars_src = env_or("BALLAST_OVMF_VARS", OVMF_VARS);
        std::fs::copy(&vars_src, dir_path.join("OVMF_VARS.fd"))
            .with_context(|| format!("copying {vars_src} (is the ovmf package installed?)"))?;
        let harness_user_data = (!opts.own_user_data).then(|| FwCfg::new(&harness_user_data()));
        let mut vm = Vm {
            console: Console::new(dir_path.join("console.log")),
            ssh: Ssh::new(&dir_path, 0)?,
            dir: Some(dir),
            dir_path,
            opts,
            qemu: Mutex::new(None),
            monitor: Mutex::new(None),
            harness_user_data,
            reset_watch: Mutex::new(ResetWatch::default()),
            forwards: Vec::new(),
            _one_at_a_time: guard,
        };
        match vm.start() {
            Ok(()) => Ok(vm),
            Err(e) => Err(e.context(format!(
                "last {FAILURE_TAIL_LINES} console lines:\n{}",
                vm.console_tail(FAILURE_TAIL_LINES)
            ))),
        }
    }

    /// The VM's directory: disk overlay, firmware variables, console log,
    /// QEMU's own output.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The host port forwarded to the guest's SSH port.
    pub fn ssh_port(&self) -> u16 {
        self.ssh.port
    }

    /// The host port on 127.0.0.1 that reaches guest TCP port `guest` (one
    /// of [`VmOptions::host_forwards`]). Panics for a port not forwarded.
    pub fn host_port(&self, guest: u16) -> u16 {
        match self.forwards.iter().find(|(_, g)| *g == guest) {
            Some((host, _)) => *host,
            None => self.fail(format_args!("guest port {guest} is not in host_forwards")),
        }
    }

    /// Polls SSH until the guest accepts the test key. Panics if QEMU exits
    /// or `timeout` passes.
    pub fn wait_ssh(&self, timeout: Duration) {
        self.wait_ssh_until(timeout, "true", |_| true);
    }

    /// Runs `probe` over SSH until it succeeds and `accept` likes its stdout.
    fn wait_ssh_until(&self, timeout: Duration, probe: &str, accept: impl Fn(&str) -> bool) {
        let mut started = Instant::now();
        loop {
            self.check_running();
            if self.unstick_firmware() {
                // A fresh QEMU boots from the start: it gets the whole timeout.
                started = Instant::now();
            }
            let attempt = run_with_timeout(&mut self.ssh.command(probe), Duration::from_secs(30));
            let last = match attempt {
                Ok(Some(out)) if out.status.success() => {
                    let stdout = String::from_utf8_lossy(&out.stdout);
                    if accept(&stdout) {
                        return;
                    }
                    format!("`{probe}` printed {stdout:?}")
                }
                Ok(Some(out)) => describe_output(probe, &out),
                Ok(None) => format!("`{probe}` over SSH hung for 30 s"),
                Err(e) => self.fail(format!("cannot run ssh: {e:#}")),
            };
            if started.elapsed() >= timeout {
                self.fail(format!(
                    "guest not reachable over SSH (port {}) within {timeout:?}; last attempt: {last}",
                    self.ssh.port
                ));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Seen under TCG, now and then: after the guest's own reset the
    /// firmware never starts again, and a system_reset does not help either
    /// (a fresh QEMU on the same disk and variables boots). The guest had
    /// already shut down cleanly and flushed its disk, so restarting QEMU
    /// loses nothing.
    /// Returns whether it restarted QEMU.
    fn unstick_firmware(&self) -> bool {
        if lock(&self.monitor).is_none() {
            return false; // powered off
        }
        let stuck = lock(&self.reset_watch).firmware_stuck(&self.console);
        if stuck {
            // A system_reset does not bring it back; a fresh QEMU on the same
            // disk, variables and SSH port does.
            eprintln!(
                "firmware printed nothing for {RESET_STALL:?} after the guest reset; starting QEMU afresh"
            );
            let restarted = self
                .stop()
                .and_then(|()| self.spawn_qemu(self.ssh.port, &self.forwards))
                .map(|(child, monitor)| {
                    *lock(&self.qemu) = Some(child);
                    *lock(&self.monitor) = Some(monitor);
                });
            if let Err(e) = restarted {
                self.fail(format!("restarting QEMU after a stuck reset: {e:#}"));
            }
        }
        stuck
    }

    /// Runs `cmd` in the guest's root shell. Panics only if ssh cannot run
    /// or hangs; the exit status is the caller's to judge.
    pub fn ssh(&self, cmd: &str) -> Output {
        self.ssh_as("root", cmd)
    }

    /// As [`Vm::ssh`], logged in as `user` with the fixture key (which
    /// provisioning must have given `user`).
    pub fn ssh_as(&self, user: &str, cmd: &str) -> Output {
        // Tests poll with ssh while the guest reboots: that is where a
        // firmware stuck after the guest's reset shows.
        self.unstick_firmware();
        match run_with_timeout(&mut self.ssh.command_as(user, cmd), SSH_COMMAND_TIMEOUT) {
            Ok(Some(out)) => out,
            Ok(None) => self.fail(format!(
                "`{cmd}` over SSH did not finish within {SSH_COMMAND_TIMEOUT:?}"
            )),
            Err(e) => self.fail(format!("cannot run ssh: {e:#}")),
        }
    }

    /// Runs `cmd` in the guest and returns its stdout; panics, with its
    /// stderr and the console, unless it exits 0.
    pub fn ssh_ok(&self, cmd: &str) -> String {
        let out = self.ssh(cmd);
        if !out.status.success() {
            self.fail(describe_output(cmd, &out));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// As [`Vm::ssh_ok`], logged in as `user`.
    pub fn ssh_as_ok(&self, user: &str, cmd: &str) -> String {
        let out = self.ssh_as(user, cmd);
        if !out.status.success() {
            self.fail(format!("as {user}: {}", describe_output(cmd, &out)));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The guest's boot id (new on every boot).
    pub fn boot_id(&self) -> String {
        self.ssh_ok("cat /proc/sys/kernel/random/boot_id")
            .trim()
            .to_string()
    }

    /// Reboots the guest cleanly and waits until it is back on SSH with a
    /// new boot id. QEMU keeps running, so disk and UEFI variables persist.
    pub fn reboot(&self) {
        let before = self.boot_id();
        // The connection may drop before ssh sees an exit status (255): that
        // is the reboot working, not failing.
        let out = self.ssh("systemctl reboot");
        if !out.status.success() && out.status.code() != Some(255) {
            self.fail(describe_output("systemctl reboot", &out));
        }
        self.wait_ssh_until(
            DEFAULT_SSH_TIMEOUT,
            "cat /proc/sys/kernel/random/boot_id",
            |id| {
                let id = id.trim();
                !id.is_empty() && id != before
            },
        );
    }

    /// Resets the machine without warning the guest (the reset button).
    pub fn reset_hard(&self) {
        let mut monitor = lock(&self.monitor);
        let result = match monitor.as_mut() {
            Some(m) => m.command("system_reset", Duration::from_secs(10)),
            None => Err(anyhow::anyhow!("the VM is powered off")),
        };
        drop(monitor);
        if let Err(e) = result {
            self.fail(format!("system_reset: {e:#}"));
        }
    }

    /// Cuts the power: QEMU exits at once, the guest gets no chance to
    /// flush. The disk and firmware variables stay for [`Vm::power_on`].
    pub fn power_off_hard(&mut self) {
        if let Err(e) = self.stop() {
            self.fail(format!("powering off: {e:#}"));
        }
    }

    /// Shuts the guest down cleanly (`systemctl poweroff`) and waits for
    /// QEMU to exit. The disk and firmware variables stay for
    /// [`Vm::power_on`].
    pub fn power_off(&mut self) {
        let out = self.ssh("systemctl poweroff");
        // As for reboot: a dropped connection (255) is the power-off working.
        if !out.status.success() && out.status.code() != Some(255) {
            self.fail(describe_output("systemctl poweroff", &out));
        }
        self.wait_powered_off();
    }

    /// Presses the power button (ACPI) and waits for the guest to shut down
    /// cleanly; for a guest the tests cannot log in to.
    pub fn power_off_acpi(&mut self) {
        let mut monitor = lock(&self.monitor);
        let pressed = match monitor.as_mut() {
            Some(m) => m.command("system_powerdown", Duration::from_secs(10)),
            None => Err(anyhow::anyhow!("the VM is powered off")),
        };
        drop(monitor);
        if let Err(e) = pressed {
            self.fail(format!("system_powerdown: {e:#}"));
        }
        self.wait_powered_off();
    }

    fn wait_powered_off(&mut self) {
        let exited = match lock(&self.qemu).as_mut() {
            Some(child) => wait_until(child, Instant::now() + POWER_OFF_TIMEOUT),
            None => Err(anyhow::anyhow!("the VM is powered off already")),
        };
        match exited {
            Ok(Some(_)) => {}
            Ok(None) => self.fail(format!(
                "the guest did not power off within {POWER_OFF_TIMEOUT:?}"
            )),
            Err(e) => self.fail(format!("waiting for the guest to power off: {e:#}")),
        }
        if let Err(e) = self.stop() {
            self.fail(format!("after power-off: {e:#}"));
        }
    }

    /// Replaces the extra QEMU arguments (e.g. another user-data seed) for
    /// the next [`Vm::power_on`]. Only while powered off.
    pub fn set_extra_args(&mut self, extra_args: Vec<String>) {
        if lock(&self.qemu).is_some() {
            self.fail("set_extra_args: power the VM off first");
        }
        self.opts.extra_args = extra_args;
    }

    /// Starts QEMU again after [`Vm::power_off_hard`] or a guest power-off,
    /// on the same disk and variables. The SSH port may change.
    pub fn power_on(&mut self) {
        if self.is_running() {
            self.fail("power_on: the VM is already running");
        }
        if let Err(e) = self.start() {
            self.fail(format!("powering on: {e:#}"));
        }
    }

    /// Whether QEMU is still running (the guest powering off ends it).
    pub fn is_running(&self) -> bool {
        matches!(self.qemu_exit(), Ok(None))
    }

    /// The last `n` lines of the serial console, escapes removed.
    pub fn console_tail(&self, n: usize) -> String {
        self.console.tail(n)
    }

    /// A mark for [`Vm::wait_console_since`]: the console's length now.
    pub fn console_mark(&self) -> u64 {
        self.console.len()
    }

    /// Waits until the console (all of it, since the VM was created) shows
    /// `needle`; returns the first line holding it. Panics after `timeout`.
    pub fn wait_console(&self, needle: &str, timeout: Duration) -> String {
        self.wait_console_since(0, needle, timeout)
    }

    /// As [`Vm::wait_console`], looking only at output after `mark`.
    pub fn wait_console_since(&self, mark: u64, needle: &str, timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let text = self.console.text_since(mark);
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if started.elapsed() >= timeout {
                self.fail(format!(
                    "console did not show {needle:?} within {timeout:?}"
                ));
            }
            // A guest that powered off prints nothing more.
            self.check_running();
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Requires that the guest booted with Secure Boot enforcing under the
    /// keys the image enrolled (bootctl: `enabled (user)`), and that Debian's
    /// kernel locked itself down for it.
    pub fn require_secure_boot(&self) {
        let status = self.ssh_ok("bootctl status --no-pager 2>&1");
        if !status
            .lines()
            .any(|l| l.trim() == "Secure Boot: enabled (user)")
        {
            self.fail(format!(
                "bootctl status does not say `Secure Boot: enabled (user)`:\n{status}"
            ));
        }
        let lockdown = self.ssh_ok("cat /sys/kernel/security/lockdown");
        if !lockdown.contains("[integrity]") {
            self.fail(format!("kernel lockdown is {lockdown:?}, want [integrity]"));
        }
    }

    /// Panics with `msg`, QEMU's state and the console tail: the one way
    /// this harness reports a failure, so every failure shows the guest.
    pub fn fail(&self, msg: impl Display) -> ! {
        let qemu = match self.qemu_exit() {
            Ok(None) => "running".to_string(),
            Ok(Some(status)) => format!("exited ({status}); {}", self.qemu_output_tail()),
            Err(e) => format!("unknown: {e:#}"),
        };
        panic!(
            "{msg}\n--- QEMU: {qemu}\n--- VM directory: {} (set BALLAST_KEEP_VMS=1 to keep it)\n\
             --- last {FAILURE_TAIL_LINES} console lines ({}):\n{}\n--- end of console",
            self.dir_path.display(),
            self.console.path().display(),
            self.console_tail(FAILURE_TAIL_LINES),
        )
    }

    fn check_running(&self) {
        match self.qemu_exit() {
            Ok(None) => {}
            Ok(Some(_)) => self.fail("QEMU exited while the test was waiting for the guest"),
            Err(e) => self.fail(format!("{e:#}")),
        }
    }

    /// `Ok(None)` while QEMU runs, its exit status once it has exited.
    fn qemu_exit(&self) -> Result<Option<ExitStatus>> {
        match lock(&self.qemu).as_mut() {
            Some(child) => child.try_wait().context("checking on QEMU"),
            None => bail!("the VM is powered off"),
        }
    }

    fn qemu_output_tail(&self) -> String {
        let path = self.dir_path.join("qemu.log");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        format!("its output:\n{}", tail_lines(&text, 20))
    }

    /// Starts QEMU on the existing overlay and variables; retries with a new
    /// host port if the one picked was taken in the meantime.
    fn start(&mut self) -> Result<()> {
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = pick_free_port().context("picking a host port for SSH")?;
            let forwards = self
                .opts
                .host_forwards
                .iter()
                .map(|&g| Ok((pick_free_port().context("picking a host port")?, g)))
                .collect::<Result<Vec<_>>>()?;
            match self.spawn_qemu(port, &forwards) {
                Ok((child, monitor)) => {
                    self.ssh.port = port;
                    self.forwards = forwards;
                    *lock(&self.qemu) = Some(child);
                    *lock(&self.monitor) = Some(monitor);
                    return Ok(());
                }
                Err(e) => {
                    let log =
                        std::fs::read_to_string(self.dir_path.join("qemu.log")).unwrap_or_default();
                    if !is_hostfwd_collision(&log) {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context(format!("no free host port after {PORT_ATTEMPTS} attempts")))
    }

    fn spawn_qemu(&self, port: u16, forwards: &[(u16, u16)]) -> Result<(Child, Monitor)> {
        let monitor_path = self.dir_path.join("monitor.sock");
        if monitor_path.exists() {
            std::fs::remove_file(&monitor_path)
                .with_context(|| format!("removing stale {}", monitor_path.display()))?;
        }
        let log_path = self.dir_path.join("qemu.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let args = qemu_args(&QemuConfig {
            dir: &self.dir_path,
            accel: accel()?,
            memory_mib: self.opts.memory_mib.unwrap_or(1536),
            cpus: self.opts.cpus.unwrap_or(2),
            ssh_port: port,
            ovmf_code: env_or("BALLAST_OVMF_CODE", OVMF_CODE),
            guest_forwards: &self.opts.guest_forwards,
            host_forwards: forwards,
            shape: self.opts.shape,
        })?;
        let mut child = Command::new("qemu-system-x86_64")
            .args(&args)
            .args(&self.opts.extra_args)
            .args(self.harness_user_data.iter().flat_map(FwCfg::qemu_args))
            .current_dir(&self.dir_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating log handle")?)
            .stderr(log)
            .spawn()
            .context("starting qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
        let connected = Monitor::connect(&monitor_path, QEMU_START_TIMEOUT, || {
            match child.try_wait().context("checking on QEMU")? {
                Some(status) => bail!(
                    "QEMU exited at start ({status}): {}",
                    std::fs::read_to_string(&log_path)
                        .unwrap_or_default()
                        .trim()
                ),
                None => Ok(()),
            }
        });
        match connected {
            Ok(monitor) => Ok((child, monitor)),
            Err(e) => {
                kill_and_reap(&mut child)?;
                Err(e)
            }
        }
    }

    /// Ends QEMU: `quit` on the monitor, a kill if that does not work.
    fn stop(&self) -> Result<()> {
        let Some(mut child) = lock(&self.qemu).take() else {
            return Ok(());
        };
        let monitor = lock(&self.monitor).take();
        if child.try_wait().context("checking on QEMU")?.is_none() {
            if let Some(monitor) = monitor {
                // A failed quit is fine: the kill below does the same job.
                if let Err(e) = monitor.quit() {
                    eprintln!("QEMU monitor quit failed ({e:#}); killing QEMU");
                }
            }
            if wait_until(&mut child, Instant::now() + Duration::from_secs(10))?.is_none() {
                kill_and_reap(&mut child)?;
            }
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(child) = lock(&self.qemu).as_mut() {
            if let Err(e) = kill_and_reap(child) {
                eprintln!("killing QEMU: {e:#}");
            }
        }
        let keep = std::env::var("BALLAST_KEEP_VMS").is_ok_and(|v| v == "1");
        if let Some(dir) = self.dir.take() {
            if keep {
                eprintln!("kept VM directory {}", dir.keep().display());
            } else if let Err(e) = dir.close() {
                eprintln!("removing {}: {e}", self.dir_path.display());
            }
        }
    }
}

struct QemuConfig<'a> {
    dir: &'a Path,
    accel: Accel,
    memory_mib: u32,
    cpus: u32,
    ssh_port: u16,
    ovmf_code: String,
    guest_forwards: &'a [String],
    /// (host port, guest port).
    host_forwards: &'a [(u16, u16)],
    shape: MachineShape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accel {
    Tcg,
    Kvm,
}

/// TCG unless `BALLAST_QEMU_ACCEL=kvm` opts in: the test machines have no
/// usable KVM.
fn accel() -> Result<Accel> {
    match std::env::var("BALLAST_QEMU_ACCEL").as_deref() {
        Err(_) | Ok("") | Ok("tcg") => Ok(Accel::Tcg),
        Ok("kvm") => Ok(Accel::Kvm),
        Ok(other) => bail!("BALLAST_QEMU_ACCEL={other:?}: expected tcg or kvm"),
    }
}

fn qemu_args(c: &QemuConfig<'_>) -> Result<Vec<String>> {
    let path = |name: &str| -> Result<String> {
        let p = c.dir.join(name).to_string_lossy().into_owned();
        // QEMU option values are comma-separated.
        if p.contains(',') {
            bail!("path {p} contains a comma, which QEMU options cannot take");
        }
        Ok(p)
    };
    let mut args: Vec<String> = vec!["-nodefaults".into(), "-no-user-config".into()];
    args.extend(["-machine".into(), "q35".into()]);
    match c.accel {
        Accel::Tcg => args.extend(["-accel".into(), "tcg".into()]),
        Accel::Kvm => args.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]),
    }
    args.extend([
        "-m".into(),
        c.memory_mib.to_string(),
        "-smp".into(),
        c.cpus.to_string(),
        "-display".into(),
        "none".into(),
        "-drive".into(),
        format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            c.ovmf_code
        ),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=1,file={}", path("OVMF_VARS.fd")?),
        "-drive".into(),
        format!("if=none,id=d0,format=qcow2,file={}", path("disk.qcow2")?),
        // restrict=on: the guest reaches nothing but the host forwards.
        "-netdev".into(),
        format!(
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{}-:22{}{}",
            c.ssh_port,
            c.host_forwards
                .iter()
                .map(|(h, g)| format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}"))
                .collect::<String>(),
            c.guest_forwards
                .iter()
                .map(|g| format!(",guestfwd={g}"))
                .collect::<String>()
        ),
        // append=on: the log spans power cycles of the same VM.
        "-chardev".into(),
        format!("file,id=ser0,path={},append=on", path("console.log")?),
        "-serial".into(),
        "chardev:ser0".into(),
        "-chardev".into(),
        format!(
            "socket,id=mon0,path={},server=on,wait=off",
            path("monitor.sock")?
        ),
        "-mon".into(),
        "chardev=mon0,mode=readline".into(),
    ]);
    let devices: &[&str] = match c.shape {
        MachineShape::Virtio => &[
            "virtio-blk-pci,drive=d0,bootindex=0",
            "virtio-net-pci,netdev=n0",
            // Entropy, so sshd and friends do not wait for it under TCG.
            "virtio-rng-pci",
        ],
        // ide.0 is the first port of the ICH9 AHCI controller q35 always has.
        MachineShape::Metal => &["ide-hd,drive=d0,bus=ide.0,bootindex=0", "e1000e,netdev=n0"],
    };
    for d in devices {
        args.extend(["-device".to_string(), d.to_string()]);
    }
    Ok(args)
}

/// A qcow2 overlay on the built image, so every VM starts from it and
/// leaves it untouched.
fn create_overlay(backing: &Path, overlay: &Path, size: Option<u64>) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(overlay);
    if let Some(size) = size {
        cmd.arg(size.to_string());
    }
    let out = cmd
        .output()
        .context("running qemu-img (is qemu-utils installed?)")?;
    if !out.status.success() {
        bail!(
            "qemu-img create failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn describe_output(cmd: &str, out: &Output) -> String {
    let hint = if out.status.code() == Some(255) {
        " (255: ssh itself failed, e.g. connection refused or dropped)"
    } else {
        ""
    };
    format!(
        "`{cmd}` failed in the guest: {}{hint}\n--- stderr:\n{}\n--- stdout:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end(),
        String::from_utf8_lossy(&out.stdout).trim_end(),
    )
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Locks `m`, also after a panic elsewhere poisoned it: a panicking test
/// must still be able to shut its VM down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How long the console may stay silent after the guest's reset before the
/// firmware counts as stuck.
/// Longer than the slowest healthy firmware start seen under TCG on a
/// loaded machine.
const RESET_STALL: Duration = Duration::from_secs(150);

/// Whether a console line is one of the last a guest prints before it
/// resets: the kernel's own last words do not always reach the console.
fn ends_in_reset(line: &str) -> bool {
    [
        "reboot: machine restart",
        "reboot: Restarting system",
        "systemd-shutdown[1]: Rebooting.",
    ]
    .iter()
    .any(|m| line.contains(m))
}

/// Notices a machine that reset itself and then printed nothing.
///
/// Fires at most once per console state: a firmware that is only slow
/// (under load) is not reset again and again, which would keep it from
/// ever booting.
#[derive(Default)]
struct ResetWatch {
    len: u64,
    since: Option<Instant>,
    fired_at_len: Option<u64>,
}

impl ResetWatch {
    fn firmware_stuck(&mut self, console: &Console) -> bool {
        let len = console.len();
        if len != self.len {
            self.len = len;
            self.since = Some(Instant::now());
            return false;
        }
        if self.fired_at_len == Some(len) {
            return false;
        }
        let ended_in_reset = console.tail(3).lines().any(ends_in_reset);
        match self.since {
            Some(t) if ended_in_reset && t.elapsed() >= RESET_STALL => {
                self.fired_at_len = Some(len);
                true
            }
            None => {
                self.since = Some(Instant::now());
                false
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_words_before_a_reset() {
        assert!(ends_in_reset(
            "[   52.580171] systemd-shutdown[1]: Rebooting."
        ));
        assert!(ends_in_reset("[   60.1] reboot: machine restart"));
        assert!(!ends_in_reset(
            "[   52.5] systemd-shutdown[1]: Powering off."
        ));
        assert!(!ends_in_reset("localhost login:"));
    }

    fn args_of(shape: MachineShape) -> Vec<String> {
        qemu_args(&QemuConfig {
            dir: Path::new("/tmp/vm"),
            accel: Accel::Tcg,
            memory_mib: 1536,
            cpus: 2,
            ssh_port: 40022,
            ovmf_code: OVMF_CODE.into(),
            guest_forwards: &[],
            host_forwards: &[],
            shape,
        })
        .unwrap()
    }

    #[test]
    fn qemu_args_isolate_the_guest() {
        let args = args_of(MachineShape::Virtio);
        let joined = args.join(" ");
        assert!(
            joined.contains("-netdev user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22"),
            "{joined}"
        );
        assert!(joined.contains("-accel tcg"), "{joined}");
        assert!(
            !joined.contains("-no-reboot"),
            "guest reboots must keep QEMU: {joined}"
        );
        assert!(joined.contains("file=/tmp/vm/disk.qcow2"), "{joined}");
        assert!(joined.contains("readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"));
        assert!(
            joined.contains("-device virtio-blk-pci,drive=d0"),
            "{joined}"
        );
    }

    #[test]
    fn metal_shape_has_no_virtio() {
        let joined = args_of(MachineShape::Metal).join(" ");
        assert!(!joined.contains("virtio"), "{joined}");
        assert!(
            joined.contains("-device ide-hd,drive=d0,bus=ide.0"),
            "{joined}"
        );
        assert!(joined.contains("-device e1000e,netdev=n0"), "{joined}");
    }

    #[test]
    fn rejects_commas_in_paths() {
        let err = qemu_args(&QemuConfig {
            dir: Path::new("/tmp/a,b"),
            accel: Accel::Kvm,
            memory_mib: 512,
            cpus: 1,
            ssh_port: 1,
            ovmf_code: OVMF_CODE.into(),
            guest_forwards: &[],
            host_forwards: &[],
            shape: MachineShape::Virtio,
        })
        .unwrap_err();
        assert!(err.to_string().contains("comma"));
    }
}
