//! A small network of Linux network namespaces for fault-injection tests.
//!
//! A [`Lab`] is a switch (a bridge inside a namespace of its own), one namespace per host
//! plugged into it by a veth pair and addressed `198.18.<subnet>.<10 + i>`, and one more veth
//! pair from the test's own namespace, where it has the address `198.18.<subnet>.1/24`. Only
//! addresses from 198.18.0.0/15 (the benchmarking range) are used, so nothing here can reach
//! or shadow a real network. The test process reaches every host through the switch; hosts
//! reach each other through it unless [`Lab::partition`] cuts them apart (blackhole routes in
//! both directions: packets vanish as on a broken link, nothing is refused). [`Lab::heal`]
//! takes the routes away again.
//!
//! The bridge lives in its own namespace because a bridge hands its frames to the iptables of
//! the namespace it is in (`br_netfilter`), and on a docker host the main namespace's
//! `FORWARD` policy is `DROP`: hosts on a bridge there cannot reach each other. The switch
//! namespace's iptables are empty.
//!
//! Everything is removed when the lab drops (deleting a namespace deletes its veth pairs);
//! leftovers of a lab with the same label from a killed run are removed when it is built.
//! Needs root (`CAP_NET_ADMIN` and `CAP_SYS_ADMIN`) and iproute2.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::tools::{run, run_ok};

/// How long one `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(30);
/// The host part of the first namespace's address.
const FIRST_HOST: u8 = 10;

/// A switch and the namespaces plugged into it.
pub struct Lab {
    label: String,
    subnet: u8,
    /// The test namespace's end of its link to the switch.
    uplink: String,
    hosts: usize,
    /// Blackhole routes in place: (namespace index, destination index).
    cuts: Vec<(usize, usize)>,
}

fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args), IP_TIMEOUT)?;
    Ok(())
}

/// Like [`ip`], but failure is fine (removing what may not exist).
fn ip_quiet(args: &[&str]) {
    let _ = run(Command::new("ip").args(args), IP_TIMEOUT);
}

impl Lab {
    /// Builds the switch for `label` (up to 6 lower-case letters or digits, unique among labs
    /// that may run at once) on `198.18.<subnet>.0/24` (unique too), with no hosts yet.
    pub fn new(label: &str, subnet: u8) -> Result<Self> {
        ensure!(
            !label.is_empty()
                && label.len() <= 6
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "lab label {label:?}: 1 to 6 lower-case letters or digits"
        );
        let lab = Self {
            label: label.to_owned(),
            subnet,
            uplink: format!("shl{label}"),
            hosts: 0,
            cuts: Vec::new(),
        };
        lab.remove_leftovers();
        let sw = lab.switch();
        ip(&["netns", "add", &sw]).context("creating the lab's switch namespace")?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        // The switch's end is made inside it, the other in the test process's namespace.
        let here = std::process::id().to_string();
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            &lab.uplink,
            "netns",
            &here,
        ])?;
        ip(&["-n", &sw, "link", "set", "up0", "master", "br0", "up"])?;
        let gateway = format!("{}/24", lab.gateway());
        ip(&["addr", "add", &gateway, "dev", &lab.uplink])?;
        ip(&["link", "set", &lab.uplink, "up"])?;
        Ok(lab)
    }

    /// The switch's namespace.
    fn switch(&self) -> String {
        format!("shoal-{}-sw", self.label)
    }

    /// The test process's own address on the lab's network.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 1)
    }

    /// The address of host `i`.
    pub fn host_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, FIRST_HOST + i as u8)
    }

    /// The namespace name of host `i`.
    pub fn namespace(&self, i: usize) -> String {
        format!("shoal-{}-{i}", self.label)
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts
    }

    /// Whether the lab has no host yet.
    pub fn is_empty(&self) -> bool {
        self.hosts == 0
    }

    /// Adds a namespace plugged into the switch; returns its index.
    pub fn add_host(&mut self) -> Result<usize> {
        let i = self.hosts;
        ensure!(i < 200, "a lab holds at most 200 hosts");
        let ns = self.namespace(i);
        let (sw, port) = (self.switch(), format!("p{i}"));
        ip(&["netns", "add", &ns]).with_context(|| format!("creating namespace {ns}"))?;
        self.hosts += 1;
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
        let addr = format!("{}/24", self.host_ip(i));
        ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(i)
    }

    /// The words that run a program inside host `i`'s namespace (`ip netns exec` execs it, so
    /// the pid a test holds is the program's).
    pub fn exec_prefix(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([self.namespace(i)])
            .collect()
    }

    /// Cuts every host of `a` off every host of `b`, both ways; the test process still reaches
    /// all of them.
    pub fn partition(&mut self, a: &[usize], b: &[usize]) -> Result<()> {
        for &x in a {
            for &y in b {
                for (from, to) in [(x, y), (y, x)] {
                    let dest = format!("{}/32", self.host_ip(to));
                    ip(&[
                        "-n",
                        &self.namespace(from),
                        "route",
                        "add",
                        "blackhole",
                        &dest,
                    ])?;
                    self.cuts.push((from, to));
                }
            }
        }
        Ok(())
    }

    /// Removes every cut [`Lab::partition`] made.
    pub fn heal(&mut self) -> Result<()> {
        while let Some((from, to)) = self.cuts.pop() {
            let dest = format!("{}/32", self.host_ip(to));
            ip(&[
                "-n",
                &self.namespace(from),
                "route",
                "del",
                "blackhole",
                &dest,
            ])?;
        }
        Ok(())
    }

    fn remove_leftovers(&self) {
        let prefix = format!("shoal-{}-", self.label);
        if let Ok(out) = run(Command::new("ip").args(["netns", "list"]), IP_TIMEOUT) {
            for name in out
                .stdout
                .lines()
                .filter_map(|l| l.split_whitespace().next())
            {
                if name.starts_with(&prefix) {
                    ip_quiet(&["netns", "del", name]);
                }
            }
        }
        ip_quiet(&["link", "del", &self.uplink]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            ip_quiet(&["netns", "del", &self.namespace(i)]);
        }
        ip_quiet(&["netns", "del", &self.switch()]);
        ip_quiet(&["link", "del", &self.uplink]);
    }
}
