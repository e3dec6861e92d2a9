//! What userspace can learn about one TCP socket that the fast path may
//! carry: its key in the socket hash (built exactly as the BPF programs
//! build it), and the kernel's own figures for it (bytes readable, bytes in
//! the send queue, data segments on the wire). Used by the self-test and the
//! stall guard; nothing here is on a hot path.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use super::abi::SockKey;

/// `SO_NETNS_COOKIE` (Linux 5.14), not in the libc crate.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// 0x0000ffff in network byte order, the third word of an IPv4-mapped address.
const V4_MAPPED_WORD: u32 = 0xffff_0000;

/// An address as the programs hold it: IPv6 words in network byte order,
/// IPv4 as IPv4-mapped.
fn words(ip: IpAddr) -> [u32; 4] {
    let o = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

fn is_loopback(w: &[u32; 4]) -> bool {
    (w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD && (w[3] & 0xff) == 127)
        || (w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == u32::to_be(1))
}

/// The keys of both ends of the connection `fd` belongs to: (this end, the
/// peer's end), as `sockbus_sock_ops` inserts them and `sockbus_sk_msg`
/// looks them up. Both ends of a loopback connection share a namespace, so
/// this socket's namespace cookie is the peer's too.
pub fn keys(fd: &impl AsFd) -> io::Result<(SockKey, SockKey)> {
    let s = socket2::SockRef::from(fd);
    let local = s
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))?;
    let peer = s
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))?;
    keys_of(local, peer, || netns_cookie(fd.as_fd().as_raw_fd()))
}

fn keys_of(
    local: SocketAddr,
    peer: SocketAddr,
    cookie: impl FnOnce() -> io::Result<u64>,
) -> io::Result<(SockKey, SockKey)> {
    let (l, r) = (words(local.ip()), words(peer.ip()));
    let netns = if is_loopback(&l) { cookie()? } else { 0 };
    let mine = SockKey {
        local_ip: l,
        remote_ip: r,
        local_port: u32::from(local.port()),
        remote_port: u32::from(peer.port()),
        netns,
    };
    let theirs = SockKey {
        local_ip: r,
        remote_ip: l,
        local_port: u32::from(peer.port()),
        remote_port: u32::from(local.port()),
        netns,
    };
    Ok((mine, theirs))
}

fn getsockopt<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: &mut T,
) -> io::Result<()> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `v` is a valid, writable `T` of `len` bytes.
    let rc = unsafe { libc::getsockopt(fd, level, name, (v as *mut T).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn netns_cookie(fd: RawFd) -> io::Result<u64> {
    let mut c = 0u64;
    getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut c)?;
    Ok(c)
}

fn ioctl_int(fd: RawFd, req: libc::Ioctl) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one int.
    if unsafe { libc::ioctl(fd, req, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// Bytes the socket has to read (`FIONREAD`; on the fast path the kernel
/// answers from the socket's redirect queue).
pub fn readable(fd: &impl AsFd) -> io::Result<usize> {
    ioctl_int(fd.as_fd().as_raw_fd(), libc::FIONREAD)
}

/// Bytes in the socket's TCP send queue, not yet acknowledged by the peer
/// (`SIOCOUTQ`). Redirected bytes never enter it.
pub fn send_queue(fd: &impl AsFd) -> io::Result<usize> {
    ioctl_int(fd.as_fd().as_raw_fd(), libc::TIOCOUTQ)
}

/// Data segments this socket sent and received over TCP (`TCP_INFO`):
/// they do not move while the fast path carries its bytes.
pub fn data_segments(fd: &impl AsFd) -> io::Result<(u32, u32)> {
    // SAFETY: tcp_info is plain integers; all zeroes is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    getsockopt(
        fd.as_fd().as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_INFO,
        &mut info,
    )?;
    Ok((info.tcpi_data_segs_out, info.tcpi_data_segs_in))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_mirror_each_other_and_carry_the_cookie_only_on_loopback() {
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:7420".parse().unwrap();
        let (mine, theirs) = keys_of(a, b, || Ok(99)).unwrap();
        assert_eq!(mine.local_ip, theirs.remote_ip);
        assert_eq!((mine.local_port, mine.remote_port), (40000, 7420));
        assert_eq!((theirs.local_port, theirs.remote_port), (7420, 40000));
        assert_eq!((mine.netns, theirs.netns), (99, 99));
        // 127.0.0.1 as the program sees it: ::ffff:127.0.0.1 in network order.
        assert_eq!(mine.local_ip[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(mine.local_ip[3].to_ne_bytes(), [127, 0, 0, 1]);
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert_eq!(keys_of(v6, v6, || Ok(7)).unwrap().0.netns, 7);
        let pod_a: SocketAddr = "10.1.0.5:40000".parse().unwrap();
        let pod_b: SocketAddr = "10.1.0.9:7420".parse().unwrap();
        let (m, _) = keys_of(pod_a, pod_b, || panic!("no cookie for pod addresses")).unwrap();
        assert_eq!(m.netns, 0);
    }
}
