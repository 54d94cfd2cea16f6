//! Kernel struct offsets and enum names from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Struct layouts depend on the kernel version and configuration (`task_struct` is even
//! randomisable), and `enum sk_rst_reason` values are renumbered between releases, so both are
//! looked up here at start-up rather than compiled in.

use std::{collections::BTreeMap, path::Path};

use btf_rs::{Btf, Type};
use observer_common::{ABSENT, BtfArgs, KernelOffsets, KprobeArgs, PayloadConfig};

use crate::reasons::ResetReasons;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Modules whose BTF is searched for kprobed functions vmlinux lacks (IPv6 may be a module).
const MODULES_WITH_PROBED_FUNCTIONS: [&str; 1] = ["ipv6"];

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read kernel BTF at {path}: {source}; observer needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (every major distribution kernel since 2020 has it)"
    )]
    Unavailable { path: String, source: btf_rs::Error },
    #[error("kernel BTF has no {0}")]
    Missing(String),
}

/// The running kernel's type information.
pub struct KernelBtf {
    btf: Btf,
    /// Split BTF of the modules in [`MODULES_WITH_PROBED_FUNCTIONS`] that are loaded.
    modules: Vec<Btf>,
}

impl KernelBtf {
    pub fn load() -> Result<Self, BtfError> {
        let mut btf = Self::from_file(Path::new(VMLINUX_BTF))?;
        for module in MODULES_WITH_PROBED_FUNCTIONS {
            let path = Path::new(VMLINUX_BTF).with_file_name(module);
            if let Ok(split) = Btf::from_split_file(&path, &btf.btf) {
                btf.modules.push(split);
            }
        }
        Ok(btf)
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        Btf::from_file(path)
            .map(|btf| Self { btf, modules: Vec::new() })
            .map_err(|source| BtfError::Unavailable { path: path.display().to_string(), source })
    }

    /// The parameter names of kernel function `func`, in order, from its prototype in BTF
    /// (vmlinux, then the modules searched).
    pub fn function_params(&self, func: &str) -> Result<Vec<String>, BtfError> {
        for btf in std::iter::once(&self.btf).chain(&self.modules) {
            let Ok(types) = btf.resolve_types_by_name(func) else { continue };
            for ty in types {
                let Type::Func(f) = ty else { continue };
                let Ok(Type::FuncProto(proto)) = btf.resolve_chained_type(&f) else { continue };
                return Ok(proto.parameters.iter().map(|p| btf.resolve_name(p).unwrap_or_default()).collect());
            }
        }
        Err(BtfError::Missing(format!("function {func}")))
    }

    /// Position of parameter `param` of `func`; `None` when the function has no such parameter
    /// or is not in BTF.
    pub fn param_index(&self, func: &str, param: &str) -> Option<u32> {
        let params = self.function_params(func).ok()?;
        params.iter().position(|p| p == param).and_then(|i| u32::try_from(i).ok())
    }

    /// Where the kprobed functions keep their arguments: the `reason` of the reset senders
    /// exists since 6.10, and its position differs (`tcp_send_active_reset(sk, reason)` on
    /// Debian's 6.12, `(sk, priority, reason)` on 6.18).
    pub fn kprobe_args(&self) -> KprobeArgs {
        let reason = |func| self.param_index(func, "reason").unwrap_or(ABSENT);
        KprobeArgs {
            active_reset_reason: reason("tcp_send_active_reset"),
            v4_reset_reason: reason("tcp_v4_send_reset"),
            v6_reset_reason: reason("tcp_v6_send_reset"),
        }
    }

    /// The argument types of BTF tracepoint `name` (`btf_trace_<name>`, a pointer to a function
    /// prototype), after its hidden first `void *__data`: what the program's context holds, each
    /// as its type's name (`sock`, `sk_rst_reason`, `int`; qualifiers and pointers stripped).
    /// `None` when the kernel has no such BTF tracepoint.
    pub fn btf_tracepoint_args(&self, name: &str) -> Option<Vec<String>> {
        let typedef = format!("btf_trace_{name}");
        let ty = self.btf.resolve_types_by_name(&typedef).ok()?.into_iter().find(|t| matches!(t, Type::Typedef(_)))?;
        let Type::Ptr(ptr) = self.btf.resolve_chained_type(ty.as_btf_type()?).ok()? else { return None };
        let Type::FuncProto(proto) = self.btf.resolve_chained_type(&ptr).ok()? else { return None };
        let names = proto.parameters.iter().skip(1).map(|param| {
            let mut ty = self.btf.resolve_chained_type(param).ok();
            for _ in 0..16 {
                match ty {
                    Some(Type::Ptr(ref p)) => ty = self.btf.resolve_chained_type(p).ok(),
                    Some(ref t) => match self.strip(t.clone()) {
                        Type::Ptr(p) => ty = self.btf.resolve_chained_type(&p).ok(),
                        t => return t.as_btf_type().and_then(|b| self.btf.resolve_name(b).ok()).unwrap_or_default(),
                    },
                    None => break,
                }
            }
            String::new()
        });
        Some(names.collect())
    }

    /// Where the BTF tracepoints keep their arguments: `tcp_send_reset`'s `reason` exists since
    /// 6.10 (`(sk, skb, reason)`).
    pub fn btf_args(&self) -> BtfArgs {
        let reason = self
            .btf_tracepoint_args("tcp_send_reset")
            .and_then(|args| args.iter().position(|t| t == "sk_rst_reason"))
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(ABSENT);
        BtfArgs { send_reset_reason: reason }
    }

    /// Fills in the struct offsets the kprobe and BTF tracepoint back ends use beyond the
    /// others' (a socket's endpoints and protocol from `sock`, a segment's from its headers).
    /// Missing members stay [`ABSENT`] and are reported in `missing`.
    pub fn endpoint_offsets(&self, offsets: &mut KernelOffsets, missing: &mut Vec<String>) {
        let mut get = |path: &str| match self.member_offset(path) {
            Ok(off) => off,
            Err(e) => {
                missing.push(e.to_string());
                ABSENT
            }
        };
        offsets.sock_family = get("sock.__sk_common.skc_family");
        offsets.sock_num = get("sock.__sk_common.skc_num");
        offsets.sock_dport = get("sock.__sk_common.skc_dport");
        offsets.sock_rcv_saddr = get("sock.__sk_common.skc_rcv_saddr");
        offsets.sock_daddr = get("sock.__sk_common.skc_daddr");
        offsets.sock_v6_rcv_saddr = get("sock.__sk_common.skc_v6_rcv_saddr");
        offsets.sock_v6_daddr = get("sock.__sk_common.skc_v6_daddr");
        offsets.skb_head = get("sk_buff.head");
        offsets.skb_network_header = get("sk_buff.network_header");
        offsets.skb_transport_header = get("sk_buff.transport_header");
        offsets.iphdr_saddr = get("iphdr.saddr");
        offsets.iphdr_daddr = get("iphdr.daddr");
        offsets.ipv6hdr_saddr = get("ipv6hdr.saddr");
        offsets.ipv6hdr_daddr = get("ipv6hdr.daddr");
        offsets.tcphdr_source = get("tcphdr.source");
        offsets.tcphdr_dest = get("tcphdr.dest");
        // A bitfield before 5.6 (then absent: the BTF set_state program is not used).
        offsets.sock_protocol = get("sock.sk_protocol");
    }

    /// What the HTTP capture programs read to find a syscall's buffer (`PayloadConfig`): the
    /// registers' places in `struct pt_regs` and the members of `struct iovec` and `struct
    /// user_msghdr` from BTF, the syscall numbers from the architecture's ABI. Why not, where
    /// the capture cannot work here.
    pub fn payload_config(&self) -> Result<PayloadConfig, String> {
        if !cfg!(target_arch = "x86_64") {
            return Err(format!(
                "the HTTP capture reads a syscall's arguments from the x86_64 registers, and this is {}",
                std::env::consts::ARCH
            ));
        }
        for (name, want) in [("sock_send_length", ["sock", "int", "int"]), ("sock_recv_length", ["sock", "int", "int"])]
        {
            match self.btf_tracepoint_args(name) {
                Some(args) if args == want => {}
                Some(args) => {
                    return Err(format!(
                        "BTF tracepoint {name} takes ({}), not the (sock, int ret, int flags) the program reads",
                        args.join(", ")
                    ));
                }
                None => return Err(format!("this kernel has no BTF tracepoint {name} (Linux 6.3+)")),
            }
        }
        let m = |path: &str| self.member_offset(path).map_err(|e| format!("kernel BTF lacks {e}"));
        let nr = |n: libc::c_long| n as u32;
        Ok(PayloadConfig {
            regs_syscall: m("pt_regs.orig_ax")?,
            regs_arg1: m("pt_regs.si")?,
            regs_arg2: m("pt_regs.dx")?,
            iovec_base: m("iovec.iov_base")?,
            iovec_len: m("iovec.iov_len")?,
            iovec_size: self.struct_size("iovec").map_err(|e| format!("kernel BTF lacks {e}"))?,
            msghdr_iov: m("user_msghdr.msg_iov")?,
            msghdr_iovlen: m("user_msghdr.msg_iovlen")?,
            nr_read: nr(libc::SYS_read),
            nr_write: nr(libc::SYS_write),
            nr_readv: nr(libc::SYS_readv),
            nr_writev: nr(libc::SYS_writev),
            nr_recvfrom: nr(libc::SYS_recvfrom),
            nr_sendto: nr(libc::SYS_sendto),
            nr_recvmsg: nr(libc::SYS_recvmsg),
            nr_sendmsg: nr(libc::SYS_sendmsg),
        })
    }

    /// Byte size of struct `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("struct `{name}`"));
        match self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| missing())?
            .into_iter()
            .find(|t| matches!(t, Type::Struct(_)))
        {
            Some(Type::Struct(s)) => u32::try_from(s.size()).map_err(|_| missing()),
            _ => Err(missing()),
        }
    }

    /// Byte offset of `path` (`"sock.__sk_common.skc_state"`): a struct name followed by member
    /// names. Anonymous struct/union members are searched through, as C does.
    pub fn member_offset(&self, path: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("member `{path}`"));
        let mut parts = path.split('.');
        let root = parts.next().ok_or_else(missing)?;
        let mut ty = self
            .btf
            .resolve_types_by_name(root)
            .map_err(|_| missing())?
            .into_iter()
            .find(|t| matches!(t, Type::Struct(_) | Type::Union(_)))
            .ok_or_else(missing)?;
        let mut bits = 0u32;
        for name in parts {
            let (member_bits, member_ty) = self.find_member(&ty, name).ok_or_else(missing)?;
            bits += member_bits;
            ty = member_ty;
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Missing(format!("byte-aligned member `{path}` (it is a bitfield)")));
        }
        Ok(bits / 8)
    }

    /// (bit offset, type) of member `name` of struct/union `ty`, looking into anonymous members.
    fn find_member(&self, ty: &Type, name: &str) -> Option<(u32, Type)> {
        let (Type::Struct(s) | Type::Union(s)) = ty else { return None };
        for member in &s.members {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            let member_ty = self.strip(self.btf.resolve_chained_type(member).ok()?);
            if member_name == name {
                return Some((member.bit_offset(), member_ty));
            }
            if member_name.is_empty()
                && let Some((inner, t)) = self.find_member(&member_ty, name)
            {
                return Some((member.bit_offset() + inner, t));
            }
        }
        None
    }

    /// Follows typedefs and qualifiers down to the underlying type.
    fn strip(&self, mut ty: Type) -> Type {
        for _ in 0..16 {
            match &ty {
                Type::Typedef(_) | Type::Volatile(_) | Type::Const(_) | Type::Restrict(_) | Type::TypeTag(_) => {
                    // A qualifier always refers to a type; a kernel whose BTF says otherwise
                    // gets the type as it is rather than a panic.
                    let Some(qualified) = ty.as_btf_type() else { break };
                    match self.btf.resolve_chained_type(qualified) {
                        Ok(next) => ty = next,
                        Err(_) => break,
                    }
                }
                _ => break,
            }
        }
        ty
    }

    /// Members of enum `name` as value → name.
    pub fn enum_values(&self, name: &str) -> Result<BTreeMap<u64, String>, BtfError> {
        let types = self.btf.resolve_types_by_name(name).map_err(|_| BtfError::Missing(format!("enum {name}")))?;
        let mut values = BTreeMap::new();
        for ty in types {
            match ty {
                Type::Enum(e) => {
                    for m in &e.members {
                        values.insert(m.val() as u64, self.btf.resolve_name(m).unwrap_or_default());
                    }
                }
                Type::Enum64(e) => {
                    for m in &e.members {
                        values.insert(m.val(), self.btf.resolve_name(m).unwrap_or_default());
                    }
                }
                _ => continue,
            }
            return Ok(values);
        }
        Err(BtfError::Missing(format!("enum {name}")))
    }

    /// The kernel's reset reason names (`enum sk_rst_reason`). Kernels before 6.10 have no such
    /// enum: the table is empty.
    pub fn reset_reasons(&self) -> ResetReasons {
        let values = self.enum_values("sk_rst_reason").unwrap_or_default();
        ResetReasons::from_names(values.into_iter().filter_map(|(v, name)| Some((u32::try_from(v).ok()?, name))))
    }

    /// The struct offsets the kernel programs use. A member this kernel lacks stays [`ABSENT`]
    /// and is reported in `missing`; the programs then do without that fact.
    pub fn kernel_offsets(&self, missing: &mut Vec<String>) -> KernelOffsets {
        let sock_done_bit = self.enum_value("sock_flags", "SOCK_DONE", missing);
        // `sk_flags` moved into `sock_common` (as `skc_flags`) in 6.18.
        let sock_flags =
            match self.member_offset("sock.sk_flags").or_else(|_| self.member_offset("sock.__sk_common.skc_flags")) {
                Ok(off) => off,
                Err(e) => {
                    missing.push(e.to_string());
                    ABSENT
                }
            };
        let mut get = |path: &str| match self.member_offset(path) {
            Ok(off) => off,
            Err(e) => {
                missing.push(e.to_string());
                ABSENT
            }
        };
        KernelOffsets {
            task_group_leader: get("task_struct.group_leader"),
            task_comm: get("task_struct.comm"),
            task_files: get("task_struct.files"),
            files_fdt: get("files_struct.fdt"),
            fdtable_max_fds: get("fdtable.max_fds"),
            fdtable_fd: get("fdtable.fd"),
            file_private_data: get("file.private_data"),
            socket_sk: get("socket.sk"),
            sock_state: get("sock.__sk_common.skc_state"),
            sock_err: get("sock.sk_err"),
            tcp_rcv_nxt: get("tcp_sock.rcv_nxt"),
            tcp_copied_seq: get("tcp_sock.copied_seq"),
            sock_net: get("sock.__sk_common.skc_net"),
            net_inum: get("net.ns.inum"),
            skb_dev: get("sk_buff.dev"),
            netdev_net: get("net_device.nd_net"),
            sock_flags,
            sock_done_bit,
            tcp_bytes_received: get("tcp_sock.bytes_received"),
            tcp_bytes_sent: get("tcp_sock.bytes_sent"),
            tcp_bytes_retrans: get("tcp_sock.bytes_retrans"),
            tcp_srtt_us: get("tcp_sock.srtt_us"),
            tcp_total_retrans: get("tcp_sock.total_retrans"),
            tcp_data_segs_in: get("tcp_sock.data_segs_in"),
            tcp_data_segs_out: get("tcp_sock.data_segs_out"),
            sock_cookie: get("sock.__sk_common.skc_cookie"),
            current_task_btf: self.current_task_btf(),
            // Filled by `endpoint_offsets`.
            ..KernelOffsets::ABSENT
        }
    }

    /// `BPF_FUNC_get_current_task_btf` (5.11+) if the kernel has the helper, else [`ABSENT`]:
    /// not a missing fact (the programs read the task through probe reads then), so not
    /// reported.
    fn current_task_btf(&self) -> u32 {
        self.enum_value("bpf_func_id", "BPF_FUNC_get_current_task_btf", &mut Vec::new())
    }

    /// The value of `variant` in `enum name`, or [`ABSENT`] (reported in `missing`).
    fn enum_value(&self, name: &str, variant: &str, missing: &mut Vec<String>) -> u32 {
        match self.enum_values(name) {
            Ok(values) => match values.iter().find(|(_, v)| v.as_str() == variant) {
                Some((value, _)) => u32::try_from(*value).unwrap_or(ABSENT),
                None => {
                    missing.push(format!("enum {name} has no {variant}"));
                    ABSENT
                }
            },
            Err(e) => {
                missing.push(e.to_string());
                ABSENT
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's BTF, when it has one: the offsets must be found and plausible.
    #[test]
    fn running_kernel_btf_has_the_offsets_we_need() {
        if !Path::new(VMLINUX_BTF).exists() {
            panic!("{VMLINUX_BTF} missing: observer's tests need a kernel with BTF (CONFIG_DEBUG_INFO_BTF=y)");
        }
        let btf = KernelBtf::load().unwrap();
        let mut missing = Vec::new();
        let offsets = btf.kernel_offsets(&mut missing);
        assert!(missing.is_empty(), "missing: {missing:?}");
        assert_eq!(offsets.file_private_data % 8, 0);
        assert!(offsets.tcp_rcv_nxt > offsets.sock_err);
        assert_eq!(offsets.sock_done_bit, 1, "SOCK_DONE is the second sock flag on every kernel");
        // The helper has had this number since it came (5.11): UAPI numbers never change.
        assert_eq!(offsets.current_task_btf, 158, "this kernel (5.11+) has bpf_get_current_task_btf");
        assert!(offsets.tcp_bytes_received > offsets.tcp_rcv_nxt);
        let reasons = btf.reset_reasons();
        assert_eq!(reasons.label(reasons.value_of("no_socket").unwrap()), "no_socket");
        assert!(reasons.value_of("tcp_abort_on_close").is_some());
    }

    /// The kprobe back end's offsets and argument positions, from this machine's BTF.
    #[test]
    fn running_kernel_btf_has_what_the_kprobes_need() {
        let btf = KernelBtf::load().expect("observer's tests need a kernel with BTF");
        let mut offsets = KernelOffsets::ABSENT;
        let mut missing = Vec::new();
        btf.endpoint_offsets(&mut offsets, &mut missing);
        assert!(missing.is_empty(), "missing: {missing:?}");
        // Wire formats: these never move.
        assert_eq!((offsets.iphdr_saddr, offsets.iphdr_daddr), (12, 16));
        assert_eq!((offsets.ipv6hdr_saddr, offsets.ipv6hdr_daddr), (8, 24));
        assert_eq!((offsets.tcphdr_source, offsets.tcphdr_dest), (0, 2));
        // struct sock_common starts with the address pair (daddr, rcv_saddr); the port pair
        // (dport, num) follows the hash.
        assert_eq!((offsets.sock_daddr, offsets.sock_rcv_saddr), (0, 4));
        assert_eq!(offsets.sock_num, offsets.sock_dport + 2);
        assert_eq!(btf.function_params("tcp_set_state").unwrap(), ["sk", "state"]);
        assert_eq!(btf.function_params("tcp_reset").unwrap()[0], "sk");
        assert_eq!(btf.function_params("tcp_v4_destroy_sock").unwrap(), ["sk"]);
        // 6.10+ (this host is newer): every reset sender takes a reason.
        let args = btf.kprobe_args();
        for index in [args.active_reset_reason, args.v4_reset_reason, args.v6_reset_reason] {
            assert!(observer_common::KPROBE_REASON_ARGS.contains(&index), "{args:?}");
        }
        assert_eq!(btf.param_index("tcp_set_state", "reason"), None);
        assert_eq!(btf.param_index("no_such_function_in_any_kernel", "sk"), None);
    }

    /// The BTF tracepoints' prototypes, from this machine's BTF (6.10+: a reset reason).
    #[test]
    fn running_kernel_btf_has_the_btf_tracepoints() {
        let btf = KernelBtf::load().expect("observer's tests need a kernel with BTF");
        assert_eq!(btf.btf_tracepoint_args("inet_sock_set_state").unwrap(), ["sock", "int", "int"]);
        assert_eq!(btf.btf_tracepoint_args("tcp_receive_reset").unwrap(), ["sock"]);
        assert_eq!(btf.btf_tracepoint_args("tcp_destroy_sock").unwrap(), ["sock"]);
        assert_eq!(btf.btf_tracepoint_args("tcp_send_reset").unwrap(), ["sock", "sk_buff", "sk_rst_reason"]);
        assert_eq!(btf.btf_tracepoint_args("no_such_tracepoint"), None);
        assert_eq!(btf.btf_args(), BtfArgs { send_reset_reason: 2 });
        let mut offsets = KernelOffsets::ABSENT;
        btf.endpoint_offsets(&mut offsets, &mut Vec::new());
        assert_ne!(offsets.sock_protocol, ABSENT, "sk_protocol is a u16 member since 5.6");
    }
}
