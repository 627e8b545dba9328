//! The qemu command line. Snapshot source and restored VMs must have the same devices in the same order, so one
//! function builds both.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::Accel;

/// Files inside a VM's run dir.
pub mod files {
    pub const QMP: &str = "qmp.sock";
    pub const AGENT: &str = "agent.sock";
    pub const PID: &str = "qemu.pid";
    pub const LOG: &str = "qemu.log";
    pub const CONSOLE: &str = "console.log";
    pub const DISK: &str = "disk.qcow2";
    pub const MODE: &str = "mode";
    /// The VM's ssh host public key (`ssh-ed25519 AAAA…`), when the server made its host key.
    pub const HOST_KEY_PUB: &str = "host_key.pub";
    /// How qemu was started (kernel, command line, memory): a saved VM is resumed with exactly that.
    pub const LAUNCH: &str = "launch.toml";
    /// The active disk's frozen layers (named snapshots' disks), newest first, one absolute path a line.
    pub const LAYERS: &str = "layers";
    /// The name of the disk file qemu writes to when a snapshot put a new overlay on top while it ran.
    pub const ACTIVE: &str = "disk.active";
    /// The VM's memory and device state while it is stopped (`fcdev stop`).
    pub const SUSPENDED: &str = "suspended";
}

#[derive(Debug, Clone)]
pub enum Net {
    /// The VM's tap on its namespace bridge.
    Tap(String),
    /// A dead-end hub: the NIC exists but reaches nothing (snapshot source VMs).
    Isolated,
    /// A private L2 switch of the snapshot cluster (a unix socket served by fcdev, see `switch.rs`): the VMs
    /// of one cluster snapshot reach each other and nothing else.
    Switch(PathBuf),
}

#[derive(Debug, Clone)]
pub enum Memory {
    Anonymous,
    /// Guest RAM in a file: `share=true` for the snapshot source (the file becomes the snapshot's memory),
    /// `share=false` for restores (the snapshot's file mapped copy-on-write).
    File {
        path: PathBuf,
        share: bool,
    },
    /// Anonymous guest RAM under the RAM block name of `File` (`memory-backend-ram,id=mem`): a VM resumed from a
    /// saved state that ran on a memory file (the saved stream holds every page, so no file is needed).
    Ram,
}

#[derive(Debug, Clone)]
pub struct Launch {
    pub accel: Accel,
    pub name: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub disk: Option<PathBuf>,
    pub net: Net,
    pub mac: String,
    pub memory: Memory,
    /// Wait for `migrate-incoming` over QMP instead of booting.
    pub incoming: bool,
    pub run_dir: PathBuf,
}

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

fn path_opt(prefix: &str, p: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(p.as_os_str());
    s
}

impl Launch {
    /// qemu's option syntax splits on commas: refuse paths that contain one instead of misparsing them.
    pub fn check_paths(&self) -> Result<(), String> {
        let mut paths: Vec<&Path> = vec![&self.run_dir, &self.kernel];
        paths.extend(self.initrd.as_deref());
        paths.extend(self.disk.as_deref());
        if let Memory::File { path, .. } = &self.memory {
            paths.push(path);
        }
        match paths.iter().find(|p| p.to_string_lossy().contains(',')) {
            Some(p) => Err(format!(
                "{} contains a comma, which qemu options cannot take: use another data dir",
                p.display()
            )),
            None => Ok(()),
        }
    }

    pub fn args(&self) -> Vec<OsString> {
        let run = &self.run_dir;
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |v: OsString| a.push(v);
        push(os("-name"));
        push(os(format!(
            "fcdev-{},process=fcdev-{}",
            self.name, self.name
        )));
        push(os("-nodefaults"));
        push(os("-no-user-config"));
        push(os("-display"));
        push(os("none"));
        push(os("-no-reboot"));
        push(os("-accel"));
        push(os(self.accel.to_string()));
        let machine = match self.memory {
            Memory::Anonymous => "q35".to_string(),
            Memory::File { .. } | Memory::Ram => "q35,memory-backend=mem".to_string(),
        };
        push(os("-machine"));
        push(os(machine));
        if self.accel == Accel::Kvm {
            push(os("-cpu"));
            push(os("host"));
        }
        push(os("-smp"));
        push(os(self.vcpus.to_string()));
        push(os("-m"));
        push(os(format!("{}M", self.memory_mb)));
        if let Memory::File { path, share } = &self.memory {
            let mut obj = OsString::from(format!(
                "memory-backend-file,id=mem,size={}M,share={},mem-path=",
                self.memory_mb,
                if *share { "on" } else { "off" }
            ));
            obj.push(path.as_os_str());
            push(os("-object"));
            push(obj);
        }
        if let Memory::Ram = &self.memory {
            push(os("-object"));
            push(os(format!(
                "memory-backend-ram,id=mem,size={}M",
                self.memory_mb
            )));
        }
        push(os("-kernel"));
        push(self.kernel.clone().into_os_string());
        if let Some(initrd) = &self.initrd {
            push(os("-initrd"));
            push(initrd.clone().into_os_string());
        }
        push(os("-append"));
        push(os(self.append.clone()));
        // ttyS0: console log; ttyS1: guest agent.
        // Appended to, not truncated: the backend writes the boot log of a restored VM's snapshot first.
        push(os("-chardev"));
        push(path_opt(
            "file,id=console,append=on,path=",
            &run.join(files::CONSOLE),
        ));
        push(os("-serial"));
        push(os("chardev:console"));
        push(os("-serial"));
        let mut agent = path_opt("unix:", &run.join(files::AGENT));
        agent.push(",server=on,wait=off");
        push(agent);
        match &self.net {
            Net::Tap(ifname) => {
                push(os("-netdev"));
                push(os(format!(
                    "tap,id=net0,ifname={ifname},script=no,downscript=no"
                )));
            }
            Net::Isolated => {
                push(os("-netdev"));
                push(os("hubport,id=net0,hubid=0"));
            }
            Net::Switch(sock) => {
                push(os("-netdev"));
                push(path_opt(
                    "stream,id=net0,server=off,addr.type=unix,addr.path=",
                    sock,
                ));
            }
        }
        push(os("-device"));
        push(os(format!(
            "virtio-net-pci,netdev=net0,mac={},romfile=",
            self.mac
        )));
        if let Some(disk) = &self.disk {
            push(os("-drive"));
            let mut d = path_opt("if=none,id=disk0,format=qcow2,file=", disk);
            d.push(",cache=writeback");
            push(d);
            push(os("-device"));
            push(os("virtio-blk-pci,drive=disk0"));
        }
        push(os("-qmp"));
        let mut qmp = path_opt("unix:", &run.join(files::QMP));
        qmp.push(",server=on,wait=off");
        push(qmp);
        push(os("-pidfile"));
        push(run.join(files::PID).into_os_string());
        if self.incoming {
            push(os("-incoming"));
            push(os("defer"));
        }
        a
    }
}

/// Quote a path for `exec:` migration URIs (run by /bin/sh).
pub fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(memory: Memory, net: Net, incoming: bool) -> Launch {
        Launch {
            accel: Accel::Tcg,
            name: "alice-n1".into(),
            vcpus: 1,
            memory_mb: 256,
            kernel: "/img/vmlinuz".into(),
            initrd: None,
            append: "console=ttyS0".into(),
            disk: Some("/run/vm/disk.qcow2".into()),
            net,
            mac: "52:54:00:00:00:0a".into(),
            memory,
            incoming,
            run_dir: "/run/vm".into(),
        }
    }

    /// Snapshot source and restore must create the same devices in the same order (migration compatibility).
    #[test]
    fn source_and_restore_have_the_same_devices() {
        let devices = |l: &Launch| -> Vec<String> {
            let args: Vec<String> = l
                .args()
                .iter()
                .map(|a| a.to_string_lossy().into())
                .collect();
            args.windows(2)
                .filter(|w| w[0] == "-device" || w[0] == "-machine" || w[0] == "-serial")
                .map(|w| format!("{} {}", w[0], w[1].split(',').next().unwrap_or("")))
                .collect()
        };
        let src = launch(
            Memory::File {
                path: "/snap/mem".into(),
                share: true,
            },
            Net::Isolated,
            false,
        );
        let dst = launch(
            Memory::File {
                path: "/snap/mem".into(),
                share: false,
            },
            Net::Tap("fct1v0".into()),
            true,
        );
        assert_eq!(devices(&src), devices(&dst));
        let dst_args: Vec<String> = dst
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into())
            .collect();
        assert!(dst_args.iter().any(|a| a.contains("share=off")));
        assert!(dst_args
            .windows(2)
            .any(|w| w[0] == "-incoming" && w[1] == "defer"));
        assert!(dst_args
            .iter()
            .any(|a| a.starts_with("tap,id=net0,ifname=fct1v0")));
    }

    #[test]
    fn quotes_paths_for_exec_uris() {
        assert_eq!(shell_quote(Path::new("/a b/it's")), "'/a b/it'\\''s'");
    }
}
