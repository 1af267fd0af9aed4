//! A small disk to fill: a tmpfs of a given size mounted on a temp dir, and ballast to take
//! its free space away and give it back. Needs root (`mount`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::tools::{run, run_ok};

/// How long `mount` or `umount` may take.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// Ballast is written in pieces of this size, then in smaller ones down to 4 KiB.
const BALLAST_PIECE_BYTES: usize = 1 << 20;

/// A tmpfs mounted on a temp dir; unmounted (lazily) when dropped.
pub struct SmallDisk {
    mount_point: TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB.
    pub fn mount(mib: u64) -> Result<Self> {
        let mount_point = tempfile::Builder::new().prefix("shoal-disk-").tempdir()?;
        run_ok(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={mib}m,mode=0700"),
                    "tmpfs",
                ])
                .arg(mount_point.path()),
            MOUNT_TIMEOUT,
        )
        .context("mounting a tmpfs")?;
        Ok(Self { mount_point })
    }

    /// The mounted directory.
    pub fn path(&self) -> &Path {
        self.mount_point.path()
    }

    /// Bytes still free on it.
    pub fn free_bytes(&self) -> Result<u64> {
        let out = run_ok(
            Command::new("stat")
                .args(["-f", "-c", "%a %S"])
                .arg(self.path()),
            MOUNT_TIMEOUT,
        )?;
        let mut words = out.stdout.split_whitespace();
        let blocks: u64 = words.next().context("stat: no block count")?.parse()?;
        let size: u64 = words.next().context("stat: no block size")?.parse()?;
        Ok(blocks * size)
    }

    fn ballast_path(&self, name: &str) -> PathBuf {
        self.path().join(format!("ballast-{name}"))
    }

    /// Writes a ballast file called `name` until the disk is full (or `limit` bytes); returns
    /// its size.
    pub fn fill(&self, name: &str, limit: Option<u64>) -> Result<u64> {
        let mut file = File::create(self.ballast_path(name))?;
        let mut written = 0u64;
        let mut piece = BALLAST_PIECE_BYTES;
        let zeros = vec![0u8; BALLAST_PIECE_BYTES];
        while piece >= 4096 {
            let want = limit.map_or(piece as u64, |l| {
                l.saturating_sub(written).min(piece as u64)
            });
            if want == 0 {
                break;
            }
            match file.write(&zeros[..want as usize]) {
                Ok(0) | Err(_) => piece /= 2,
                Ok(n) => written += n as u64,
            }
        }
        let _ = file.flush();
        Ok(written)
    }

    /// Deletes the ballast file `name`, giving its space back.
    pub fn free(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.ballast_path(name)).context("removing ballast")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = run(
            Command::new("umount")
                .arg("-l")
                .arg(self.mount_point.path()),
            MOUNT_TIMEOUT,
        );
    }
}
