//! Network-change wake-ups: tells the driver when addresses or routes change, so the pool can
//! retry servers at once instead of waiting out a long backoff (and probe links that look up).
//!
//! On Linux the kernel announces changes on a `NETLINK_ROUTE` socket subscribed to the
//! address and route groups; the messages are not parsed, any of them counts. Elsewhere the
//! interface addresses are polled every [`PROBE_INTERVAL`] and compared with the last look.
//! Either way a burst (a DHCP renewal adds an address and several routes) becomes one
//! notification [`DEBOUNCE`] after its first message.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Changes that follow the first one within this time are reported together with it.
pub(crate) const DEBOUNCE: Duration = Duration::from_secs(1);

/// How often the portable fallback looks at the interface addresses.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Watches the network until `stop` fires, sending `()` on `changes` after each (debounced)
/// change. A change while one is still unread is merged into it.
pub(crate) async fn run(changes: mpsc::Sender<()>, stop: CancellationToken) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = watch(&changes) => {}
    }
}

#[cfg(target_os = "linux")]
async fn watch(changes: &mpsc::Sender<()>) {
    match netlink::Socket::open() {
        Ok(mut socket) => {
            tracing::debug!("watching NETLINK_ROUTE for address and route changes");
            debounced(changes, &mut socket).await;
            tracing::warn!("netlink watch ended; falling back to polling the interfaces");
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot open NETLINK_ROUTE; polling the interfaces");
        }
    }
    debounced(changes, &mut Probe::new()).await;
}

#[cfg(not(target_os = "linux"))]
async fn watch(changes: &mpsc::Sender<()>) {
    debounced(changes, &mut Probe::new()).await;
}

/// Something that says when the network changed.
trait ChangeSource {
    /// Resolves at the next change; an error means the source is gone.
    async fn next(&mut self) -> std::io::Result<()>;
}

/// Sends one notification per burst of `next_change`, [`DEBOUNCE`] after its first item.
/// Returns when `next_change` fails (its source is gone) or the driver is.
async fn debounced(changes: &mpsc::Sender<()>, source: &mut impl ChangeSource) {
    loop {
        if let Err(e) = source.next().await {
            tracing::warn!(error = %e, "network watch failed");
            return;
        }
        let quiet = tokio::time::sleep(DEBOUNCE);
        tokio::pin!(quiet);
        loop {
            tokio::select! {
                () = &mut quiet => break,
                r = source.next() => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "network watch failed");
                        return;
                    }
                }
            }
        }
        tracing::info!("network changed");
        match changes.try_send(()) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
            Err(mpsc::error::TrySendError::Closed(())) => return,
        }
    }
}

/// The portable source: polls the interface addresses and reports when they differ from
/// the previous look.
struct Probe {
    last: BTreeSet<String>,
}

impl Probe {
    fn new() -> Self {
        Self {
            last: interface_addresses(),
        }
    }
}

impl ChangeSource for Probe {
    async fn next(&mut self) -> std::io::Result<()> {
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let now = interface_addresses();
            if now != self.last {
                self.last = now;
                return Ok(());
            }
        }
    }
}

/// Whether the machine has any network beyond loopback: some interface that is up and has
/// an address. Without one no route can exist, so dialing a remote server is pointless until
/// a network change. When the interfaces cannot be read this says `true`: better a dial
/// that fails than a daemon that never dials.
pub(crate) fn has_network() -> bool {
    read_interface_addresses().is_none_or(|a| !a.is_empty())
}

/// The addresses of every interface that is up, except loopback, as text (stable order).
/// Empty when they cannot be read.
pub(crate) fn interface_addresses() -> BTreeSet<String> {
    read_interface_addresses().unwrap_or_default()
}

fn read_interface_addresses() -> Option<BTreeSet<String>> {
    use nix::net::if_::InterfaceFlags;

    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    Some(
        addrs
            .filter(|a| {
                a.flags.contains(InterfaceFlags::IFF_UP)
                    && !a.flags.contains(InterfaceFlags::IFF_LOOPBACK)
            })
            .filter_map(|a| {
                let addr = a.address?;
                let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                    (Some(v4), _) => v4.ip().to_string(),
                    (_, Some(v6)) => v6.ip().to_string(),
                    _ => return None,
                };
                Some(format!("{} {ip}", a.interface_name))
            })
            .collect(),
    )
}

#[cfg(target_os = "linux")]
mod netlink {
    use std::os::fd::{AsRawFd as _, OwnedFd};
    use std::time::Duration;

    use nix::errno::Errno;
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv,
        setsockopt, socket, sockopt,
    };
    use nix::sys::time::TimeVal;
    use tokio::sync::mpsc;

    /// The multicast groups of `rtnetlink(7)` we listen to: addresses and routes, both
    /// families. Link events are left out: some wireless drivers send them for every scan.
    const GROUPS: nix::libc::c_int = nix::libc::RTMGRP_IPV4_IFADDR
        | nix::libc::RTMGRP_IPV6_IFADDR
        | nix::libc::RTMGRP_IPV4_ROUTE
        | nix::libc::RTMGRP_IPV6_ROUTE;

    /// How often the reader thread looks up from `recv` to see whether it is still wanted.
    const RECV_TIMEOUT: Duration = Duration::from_secs(1);

    /// A `NETLINK_ROUTE` socket subscribed to [`GROUPS`].
    ///
    /// A plain thread blocks in `recv` and forwards each notification: registering a raw
    /// descriptor with tokio's reactor needs `unsafe`, which this crate does without. The
    /// thread ends within [`RECV_TIMEOUT`] of this value being dropped.
    pub(super) struct Socket {
        notifications: mpsc::Receiver<std::io::Result<()>>,
    }

    impl Socket {
        /// Opens and subscribes (no privileges needed) and starts the reader thread.
        pub(super) fn open() -> std::io::Result<Self> {
            let fd = socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkRoute,
            )?;
            // The groups are small positive flags; the cast cannot lose bits.
            let groups = GROUPS as u32;
            bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
            let timeout = TimeVal::new(RECV_TIMEOUT.as_secs() as _, 0);
            setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
            let (tx, notifications) = mpsc::channel(16);
            std::thread::Builder::new()
                .name("muxd-netlink".to_owned())
                .spawn(move || read_loop(&fd, &tx))?;
            Ok(Self { notifications })
        }
    }

    fn read_loop(fd: &OwnedFd, tx: &mpsc::Sender<std::io::Result<()>>) {
        // Notifications are small; a truncated one still counts as a change.
        let mut buf = vec![0u8; 8192];
        while !tx.is_closed() {
            let event = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(_) => Ok(()),
                // The kernel dropped notifications we were too slow for: something changed
                // all the same.
                Err(Errno::ENOBUFS) => Ok(()),
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => Err(std::io::Error::from(e)),
            };
            let failed = event.is_err();
            // A full channel already holds a change for the driver; this one merges into it.
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(event) {
                return;
            }
            if failed {
                return;
            }
        }
    }

    impl super::ChangeSource for Socket {
        async fn next(&mut self) -> std::io::Result<()> {
            self.notifications
                .recv()
                .await
                .unwrap_or_else(|| Err(std::io::Error::other("netlink reader ended")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Changes fed by the test.
    struct Fed(mpsc::Receiver<()>);

    impl ChangeSource for Fed {
        async fn next(&mut self) -> std::io::Result<()> {
            self.0
                .recv()
                .await
                .ok_or_else(|| std::io::Error::other("closed"))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_notification_after_the_debounce() {
        let (tx, mut rx) = mpsc::channel(1);
        let (burst_tx, burst_rx) = mpsc::channel::<()>(16);
        let task = tokio::spawn(async move { debounced(&tx, &mut Fed(burst_rx)).await });
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            burst_tx.send(()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rx.recv().await.unwrap();
        assert_eq!(
            start.elapsed(),
            DEBOUNCE,
            "one notification, a second after the first"
        );
        assert!(rx.try_recv().is_err(), "the burst was merged");

        // A later change is reported on its own.
        burst_tx.send(()).await.unwrap();
        rx.recv().await.unwrap();
        drop(burst_tx);
        // The source is gone: the watch ends instead of spinning.
        task.await.unwrap();
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_netlink_socket_opens_without_privileges() {
        // Reading needs a real change, which needs CAP_NET_ADMIN; opening and subscribing
        // must work for any user, or the daemon would fall back to polling.
        netlink::Socket::open().unwrap();
    }

    #[test]
    fn interface_addresses_leave_out_loopback() {
        assert_eq!(has_network(), !interface_addresses().is_empty());
        assert!(
            interface_addresses()
                .iter()
                .all(|a| !a.ends_with(" 127.0.0.1") && !a.ends_with(" ::1")),
        );
    }
}
