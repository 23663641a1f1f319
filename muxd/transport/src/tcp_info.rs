//! The kernel's round-trip estimate for a TCP socket (Linux `TCP_INFO`).
//!
//! Neither socket2 nor nix expose `TCP_INFO`, so this is the one place in muxd that calls
//! `getsockopt` itself. The smoothed RTT (`tcpi_rtt`) measures the network path only, with no
//! TLS or server work in it, which is what the lag history's `tcp` source means.

use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::TcpStream;

/// The kernel's smoothed round-trip time for `tcp`, or `None` where the platform has no
/// `TCP_INFO` or the kernel has no estimate yet (it reports 0 before the first ACK'd data).
pub fn tcp_rtt(tcp: &TcpStream) -> std::io::Result<Option<Duration>> {
    let micros = rtt_micros(tcp.as_raw_fd())?;
    Ok(micros
        .filter(|&us| us > 0)
        .map(|us| Duration::from_micros(u64::from(us))))
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn rtt_micros(fd: std::os::fd::RawFd) -> std::io::Result<Option<u32>> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>())
        .map_err(|_| std::io::Error::other("tcp_info too large for socklen_t"))?;
    // SAFETY: `info` is a zeroed, properly aligned `tcp_info` and `len` holds its size, so the
    // kernel writes at most `len` bytes into memory we own; `fd` is borrowed from a live
    // socket for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Older kernels fill a shorter struct; `tcpi_rtt` is in every version's prefix, but check.
    let rtt_end = std::mem::offset_of!(libc::tcp_info, tcpi_rtt) + size_of::<u32>();
    if (len as usize) < rtt_end {
        return Ok(None);
    }
    // SAFETY: zero-initialised and then (partly) written by the kernel; every field is a plain
    // integer, for which any bit pattern is valid.
    let info = unsafe { info.assume_init() };
    Ok(Some(info.tcpi_rtt))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn rtt_micros(_fd: std::os::fd::RawFd) -> std::io::Result<Option<u32>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_loopback_connection_has_a_small_rtt() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.unwrap().0 });
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut server = accept.await.unwrap();
        // A round of data gives the kernel an RTT sample beyond the handshake.
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();

        let rtt = tcp_rtt(&client).unwrap();
        if cfg!(any(target_os = "linux", target_os = "android")) {
            let rtt = rtt.expect("the kernel has an estimate after a round trip");
            assert!(rtt < Duration::from_millis(50), "{rtt:?} on loopback");
        } else {
            assert_eq!(rtt, None);
        }
    }
}
