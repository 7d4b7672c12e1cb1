//! VM lane: boots Debian's kernel under virtme-ng and runs the `#[ignore]`d
//! VM tests inside it.
//!
//! The host kernel lacks IPVS, kernel WireGuard and ESP, so those paths are
//! tested in Debian's kernel (which has them as modules), booted by
//! virtme-ng on the host's own root filesystem: the guest sees the host's
//! files (read-only; /tmp, /etc, /var, ... are copy-on-write overlays), so
//! test binaries built on the host run in it unchanged.
//!
//! The guest runs a generated shell script that prints sentinel lines tagged
//! with a per-run nonce: the kernel release, then the exit status of every
//! test binary. The lane passes only if every sentinel is there, every
//! binary exited 0 and every binary reported at least one passed test: a VM
//! that never booted, a guest that crashed half-way, or a binary that ran no
//! test all fail the lane instead of passing by skipping. vng's own exit code
//! (the script's status, or 255 when the guest died) is only cross-checked.

use std::{
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};

use crate::workspace::{display, root};

/// Upper bound for one VM run: boot (~15 s under software emulation) plus
/// every test; a hung guest must not hang `cargo xtask test`.
const TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Guest memory: room for the test binaries and their namespaces.
const MEMORY: &str = "2G";

/// More vCPUs than this only slows software emulation down.
const MAX_CPUS: usize = 4;

/// Boot-console lines shown when the VM fails (they name the panic, the
/// missing module, ...); a passing run shows none.
const CONSOLE_TAIL: usize = 80;

/// Debian's kernel image to boot: the newest `/boot/vmlinuz-*-amd64` whose
/// modules are installed (virtme-ng loads modules from the host's
/// /lib/modules, and IPVS, WireGuard and ESP are modules there).
pub fn kernel_image() -> Result<PathBuf> {
    let entries = match fs::read_dir("/boot") {
        Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| e.file_name()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).context("cannot list /boot"),
    };
    let newest = entries
        .iter()
        .filter_map(|name| name.to_str())
        .filter_map(|name| name.strip_prefix("vmlinuz-"))
        .filter(|release| release.ends_with("-amd64"))
        .filter(|release| Path::new("/lib/modules").join(release).is_dir())
        .max_by_key(|release| version_key(release));
    match newest {
        Some(release) => Ok(Path::new("/boot").join(format!("vmlinuz-{release}"))),
        None => bail!(
            "no Debian kernel to boot for the VM lane: want /boot/vmlinuz-<release>-amd64 \
             with /lib/modules/<release>; run `cargo xtask setup` (it installs linux-image-amd64)"
        ),
    }
}

/// Boots the VM once and runs every test binary inside it with
/// `--ignored --test-threads=1`, streaming the output to stdout. Fails if the
/// VM does not start, times out, or if any binary fails or runs no test.
pub fn run_tests(binaries: &[PathBuf]) -> Result<()> {
    if binaries.is_empty() {
        bail!("no test binary given to the VM lane: it would run nothing");
    }
    let binaries = binaries
        .iter()
        .map(|b| fs::canonicalize(b).with_context(|| format!("VM test binary {} not found", b.display())))
        .collect::<Result<Vec<_>>>()?;
    let commands: Vec<String> = binaries
        .iter()
        .map(|b| format!("{} --ignored --test-threads=1", shell_quote(&b.to_string_lossy())))
        .collect();
    let run = boot(&commands)?;
    let failures = run.report.failures(&run.release, &binaries, run.status);
    if !failures.is_empty() {
        if !run.report.finished(binaries.len()) {
            eprintln!(
                "---- last lines of the VM's console (vng stderr) ----\n{}----",
                run.console
            );
        }
        bail!("VM lane failed (Linux {}):\n  {}", run.release, failures.join("\n  "));
    }
    eprintln!(
        "VM lane: {} test(s) in {} binary(ies) passed inside Linux {} (boot {:.1} s, total {:.1} s)",
        run.report.passed(),
        binaries.len(),
        run.release,
        run.report.boot.unwrap_or_default().as_secs_f64(),
        run.took.as_secs_f64()
    );
    Ok(())
}

/// Runs `binary ARGS` (a benchmark) inside Debian's kernel, its output
/// streamed; fails unless the guest ran it and it exited 0.
pub fn run_program(binary: &Path, args: &[String]) -> Result<()> {
    let binary = fs::canonicalize(binary).with_context(|| format!("{} not found", binary.display()))?;
    let command = std::iter::once(binary.to_string_lossy().into_owned())
        .chain(args.iter().cloned())
        .map(|w| shell_quote(&w))
        .collect::<Vec<_>>()
        .join(" ");
    let run = boot(&[command])?;
    match (&run.report.kernel, run.report.exits.first()) {
        (Some(kernel), Some((0, 0))) if *kernel == run.release => Ok(()),
        _ => {
            eprintln!(
                "---- last lines of the VM's console (vng stderr) ----\n{}----",
                run.console
            );
            bail!(
                "{} failed in the VM (Linux {}): {:?}",
                binary.display(),
                run.release,
                run.report
            )
        }
    }
}

/// What one VM run left.
struct Finished {
    release: String,
    status: ExitStatus,
    report: Report,
    console: String,
    took: Duration,
}

/// Boots Debian's kernel on a script running `commands` (shell words),
/// streams the guest's output, and waits at most [`TIMEOUT`] (then kills
/// the VM and fails).
fn boot(commands: &[String]) -> Result<Finished> {
    let vng =
        crate::setup::python_command("vng").context("virtme-ng's `vng` is not installed: run `cargo xtask setup`")?;
    let image = kernel_image()?;
    let release = release_of(&image)?;
    let run = RunDir::create()?;
    let tag = format!("mesh-vm-lane-{}:", run.nonce);
    fs::write(run.script(), script(&tag, &root(), commands))
        .with_context(|| format!("cannot write {}", run.script().display()))?;

    let mut cmd = vng_command(&vng, &image, &run);
    eprintln!("+ {}", display(&cmd));
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "could not start `{}`: run `cargo xtask setup` (it installs virtme-ng)",
            display(&cmd)
        )
    })?;
    let stdout = child.stdout.take().expect("reason: stdout is piped");
    let stderr = child.stderr.take().expect("reason: stderr is piped");
    let guest = thread::spawn({
        let tag = tag.clone();
        move || stream_guest(stdout, &tag, started)
    });
    let console = thread::spawn(move || console_tail(stderr));

    let Some(status) = wait_bounded(&mut child, TIMEOUT)? else {
        kill_vm(&mut child, &run);
        bail!(
            "the VM run timed out after {} min; the guest was killed (rerun the commands inside `vng --run {}` to see where they hang)",
            TIMEOUT.as_secs() / 60,
            image.display()
        );
    };
    let report = guest.join().expect("reason: the guest output reader does not panic")?;
    let console = console.join().expect("reason: the console reader does not panic");
    Ok(Finished {
        release,
        status,
        report,
        console,
        took: started.elapsed(),
    })
}

/// The vng invocation: Debian's kernel, software emulation (KVM fails on
/// these machines), root in the guest, the generated script, and a QEMU
/// pidfile so a timeout can kill the emulator itself (vng runs it as a
/// grandchild).
fn vng_command(vng: &Path, image: &Path, run: &RunDir) -> Command {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_CPUS);
    let mut cmd = Command::new(vng);
    cmd.arg("--run")
        .arg(image)
        .args(["--disable-kvm", "--memory", MEMORY, "--cpus", &cpus.to_string()])
        .args(["--user", "root"])
        // The kernel console goes to vng's stderr; kept for failure reports.
        .arg("--verbose")
        .arg("--exec")
        .arg(format!("sh {}", shell_quote(&run.script().to_string_lossy())))
        // vng hands these to virtme-run through `sh -c`: quote the path.
        .arg("--qemu-opts=-pidfile")
        .arg(format!("--qemu-opts={}", shell_quote(&run.pidfile().to_string_lossy())))
        .current_dir(root())
        // Piped, not inherited: QEMU reopens /proc/self/fd/1 and 2, which on a
        // regular file starts writing at offset 0 over what we wrote.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The script the guest runs: every command in turn, each framed by
/// sentinels, all output on stdout so libtest's report stays in order.
fn script(tag: &str, workdir: &Path, commands: &[String]) -> String {
    let mut s = format!(
        "# Generated by xtask/src/vm.rs; runs inside the VM.\n\
         exec 2>&1\n\
         export RUST_BACKTRACE=1\n\
         echo \"{tag} kernel $(uname -r)\"\n\
         # virtme-ng leaves bpffs unmounted; eBPF tests pin maps there.\n\
         mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n\
         cd {} || exit 1\n\
         status=0\n",
        shell_quote(&workdir.to_string_lossy())
    );
    for (i, command) in commands.iter().enumerate() {
        s += &format!(
            "echo \"{tag} start {i}\"\n\
             {command}\n\
             rc=$?\n\
             echo \"{tag} exit {i} $rc\"\n\
             [ $rc -eq 0 ] || status=1\n"
        );
    }
    s += &format!("echo \"{tag} done\"\nexit $status\n");
    s
}

/// What the guest reported through its sentinels and libtest summaries.
#[derive(Debug, Default)]
struct Report {
    /// `uname -r` in the guest; None if the script never ran.
    kernel: Option<String>,
    /// Time from spawning vng to the script's first line.
    boot: Option<Duration>,
    /// Per binary index: exit status, if it finished.
    exits: Vec<(usize, i32)>,
    /// Per binary index: (passed, failed) of its last `test result:` line.
    results: Vec<(usize, u64, u64)>,
    done: bool,
}

impl Report {
    /// Updates the report from one line of guest output.
    fn record(&mut self, tag: &str, current: &mut Option<usize>, line: &str) {
        if let Some(sentinel) = line.strip_prefix(tag) {
            let words: Vec<&str> = sentinel.split_whitespace().collect();
            match words.as_slice() {
                ["kernel", release] => self.kernel = Some((*release).to_owned()),
                ["start", i] => *current = i.parse().ok(),
                ["exit", i, rc] => {
                    if let (Ok(i), Ok(rc)) = (i.parse(), rc.parse()) {
                        self.exits.push((i, rc));
                    }
                    *current = None;
                }
                ["done"] => self.done = true,
                _ => {}
            }
        } else if let (Some(i), Some((passed, failed))) = (*current, libtest_summary(line)) {
            self.results.retain(|(j, _, _)| *j != i);
            self.results.push((i, passed, failed));
        }
    }

    /// Every reason the run does not count as passed; empty if it does.
    fn failures(&self, release: &str, binaries: &[PathBuf], vng: ExitStatus) -> Vec<String> {
        let Some(kernel) = &self.kernel else {
            return vec![format!(
                "the VM never ran the test script (vng: {vng}); see its console above"
            )];
        };
        let mut failures = Vec::new();
        if kernel != release {
            failures.push(format!("the guest runs Linux {kernel}, not {release}"));
        }
        for (i, binary) in binaries.iter().enumerate() {
            let name = binary.display();
            match self.exits.iter().find(|(j, _)| *j == i) {
                None => {
                    failures.push(format!(
                        "{name} did not finish: the guest died or stopped (see its console)"
                    ));
                    continue;
                }
                Some((_, 0)) => {}
                Some((_, rc)) => failures.push(format!("{name} failed inside the VM (exit status {rc})")),
            }
            match self.results.iter().find(|(j, _, _)| *j == i) {
                None => failures.push(format!("{name} printed no libtest summary")),
                Some((_, 0, 0)) => failures.push(format!(
                    "{name} ran no test: it has no #[ignore]d VM test, or they were filtered out"
                )),
                Some(_) => {}
            }
        }
        if !self.done {
            failures.push("the test script did not reach its end".to_owned());
        }
        if failures.is_empty() && !vng.success() {
            failures.push(format!("every binary passed, yet vng exited with {vng}"));
        }
        failures
    }

    /// Whether the guest ran the whole script; if not, its console says why.
    fn finished(&self, binaries: usize) -> bool {
        self.kernel.is_some() && self.done && (0..binaries).all(|i| self.exits.iter().any(|(j, _)| *j == i))
    }

    fn passed(&self) -> u64 {
        self.results.iter().map(|(_, passed, _)| passed).sum()
    }
}

/// `(passed, failed)` from libtest's `test result: ok. 3 passed; 0 failed; ...`.
fn libtest_summary(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |what: &str| {
        rest.split(';')
            .find_map(|part| part.trim().strip_suffix(what)?.trim().rsplit(' ').next()?.parse().ok())
    };
    Some((count("passed")?, count("failed")?))
}

/// Copies the guest's stdout to ours line by line while recording sentinels.
fn stream_guest(stdout: impl Read, tag: &str, started: Instant) -> Result<Report> {
    let mut report = Report::default();
    let mut current = None;
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    let out = io::stdout();
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .context("cannot read the VM's output")?
            == 0
        {
            return Ok(report);
        }
        // A closed stdout must not stop the draining, or the guest would block.
        let mut out = out.lock();
        let _ = out.write_all(&line).and_then(|()| out.flush());
        let text = String::from_utf8_lossy(&line);
        let before = report.kernel.is_some();
        report.record(tag, &mut current, text.trim_end());
        if !before && report.kernel.is_some() {
            report.boot = Some(started.elapsed());
        }
    }
}

/// The last [`CONSOLE_TAIL`] lines of vng's stderr (the kernel console).
fn console_tail(stderr: impl Read) -> String {
    let mut tail = std::collections::VecDeque::with_capacity(CONSOLE_TAIL);
    for line in BufReader::new(stderr).split(b'\n').map_while(|l| l.ok()) {
        if tail.len() == CONSOLE_TAIL {
            tail.pop_front();
        }
        tail.push_back(String::from_utf8_lossy(&line).into_owned());
    }
    tail.into_iter().map(|l| l + "\n").collect()
}

/// Waits for `child` at most `timeout`; None if it is still running.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("cannot wait for vng")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Kills QEMU (from its pidfile), then vng if it does not exit on its own.
fn kill_vm(child: &mut Child, run: &RunDir) {
    let qemu = fs::read_to_string(run.pidfile())
        .ok()
        .and_then(|s| s.trim().parse::<libc::pid_t>().ok());
    if let Some(pid) = qemu.filter(|pid| *pid > 0) {
        // SAFETY: kill(2) has no memory preconditions; pid is QEMU's, read
        // from the pidfile QEMU removes when it exits, and is positive, so it
        // cannot address a process group.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if !matches!(wait_bounded(child, Duration::from_secs(10)), Ok(Some(_))) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A private directory for one run's script and QEMU pidfile; removed on drop.
struct RunDir {
    path: PathBuf,
    nonce: String,
}

impl RunDir {
    /// Made under the temporary directory, which the guest sees (its /tmp is
    /// an overlay over the host's).
    fn create() -> Result<RunDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let nonce = format!("{:x}{nanos:x}", std::process::id());
        let path = std::env::temp_dir().join(format!("mesh-vm-lane-{nonce}"));
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(RunDir { path, nonce })
    }

    fn script(&self) -> PathBuf {
        self.path.join("run.sh")
    }

    fn pidfile(&self) -> PathBuf {
        self.path.join("qemu.pid")
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The release of a `/boot/vmlinuz-<release>` image.
fn release_of(image: &Path) -> Result<String> {
    image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_owned)
        .with_context(|| format!("{} is not named vmlinuz-<release>", image.display()))
}

/// Orders releases like `6.1.0-56-amd64` by their numbers.
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// `s` as one word for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: &str = "mesh-vm-lane-1:";

    fn report(lines: &[&str]) -> Report {
        let (mut report, mut current) = (Report::default(), None);
        for line in lines {
            report.record(TAG, &mut current, line);
        }
        report
    }

    fn ok() -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus::from_raw(0)
    }

    #[test]
    fn orders_kernel_releases_by_number() {
        assert!(version_key("6.10.0-1-amd64") > version_key("6.9.0-9-amd64"));
        assert!(version_key("6.1.0-56-amd64") > version_key("6.1.0-9-amd64"));
    }

    #[test]
    fn reads_libtest_summaries() {
        let line = "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 1.2s";
        assert_eq!(libtest_summary(line), Some((3, 0)));
        let line = "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(libtest_summary(line), Some((1, 1)));
        assert_eq!(libtest_summary("running 3 tests"), None);
    }

    #[test]
    fn a_complete_run_passes() {
        let bins = [PathBuf::from("/t/vm_a")];
        let r = report(&[
            "mesh-vm-lane-1: kernel 6.1.0-56-amd64",
            "mesh-vm-lane-1: start 0",
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "mesh-vm-lane-1: exit 0 0",
            "mesh-vm-lane-1: done",
        ]);
        assert_eq!(r.failures("6.1.0-56-amd64", &bins, ok()), Vec::<String>::new());
    }

    #[test]
    fn skipping_or_dying_fails() {
        let bins = [PathBuf::from("/t/vm_a"), PathBuf::from("/t/vm_b")];
        let no_boot = report(&[]);
        assert_eq!(no_boot.failures("6.1.0-56-amd64", &bins, ok()).len(), 1);
        let r = report(&[
            "mesh-vm-lane-1: kernel 6.1.0-56-amd64",
            "mesh-vm-lane-1: start 0",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 5 filtered out",
            "mesh-vm-lane-1: exit 0 0",
            "mesh-vm-lane-1: start 1",
        ]);
        let failures = r.failures("6.1.0-56-amd64", &bins, ok());
        assert!(failures.iter().any(|f| f.contains("vm_a ran no test")), "{failures:?}");
        assert!(
            failures.iter().any(|f| f.contains("vm_b did not finish")),
            "{failures:?}"
        );
        assert!(
            failures.iter().any(|f| f.contains("did not reach its end")),
            "{failures:?}"
        );
    }

    #[test]
    fn sentinels_need_the_run_nonce() {
        let r = report(&["mesh-vm-lane-2: kernel 6.1.0-56-amd64", "mesh-vm-lane-2: done"]);
        assert!(r.kernel.is_none() && !r.done, "another run's sentinels were accepted");
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("/tmp/a b/it's"), r"'/tmp/a b/it'\''s'");
    }
}
