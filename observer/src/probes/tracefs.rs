//! Tracepoint record layouts, read from tracefs `format` files at start-up.
//!
//! Layouts change between kernels (`family` appeared in 5.12, `tcp_send_reset` was rewritten in
//! 6.10), so the programs get every offset from here instead of compiling one in.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use observer_common::{ABSENT, SendResetFields, SetStateFields, SkTupleFields};

/// Where tracefs usually is; the first that has `events/` wins.
const TRACEFS_CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it on /sys/kernel/tracing failed ({0}); \
         mount it with `mount -t tracefs tracefs /sys/kernel/tracing` (needs CAP_SYS_ADMIN)"
    )]
    Mount(io::Error),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: malformed field line {line:?}")]
    Malformed { path: PathBuf, line: String },
    #[error("tracepoint {tracepoint} has no field `{field}` on this kernel")]
    MissingField { tracepoint: String, field: &'static str },
}

/// One `field:` line of a format file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// The parsed record layout of one tracepoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFormat {
    pub tracepoint: String,
    pub fields: Vec<FormatField>,
}

impl EventFormat {
    /// Parses the text of a `format` file. `tracepoint` names it in errors.
    pub fn parse(tracepoint: &str, text: &str) -> Result<Self, TracefsError> {
        let malformed =
            |line: &str| TracefsError::Malformed { path: PathBuf::from(tracepoint), line: line.to_string() };
        let mut fields = Vec::new();
        for line in text.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("field:") else { continue };
            // `field:__u8 saddr[4];	offset:22;	size:4;	signed:0;`
            let mut parts = rest.split(';').map(str::trim);
            let decl = parts.next().ok_or_else(|| malformed(line))?;
            let name = decl
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()
                .map(|n| n.split('[').next().unwrap_or(n))
                .filter(|n| !n.is_empty())
                .ok_or_else(|| malformed(line))?;
            let mut offset = None;
            let mut size = None;
            for part in parts {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            let (Some(offset), Some(size)) = (offset, size) else { return Err(malformed(line)) };
            fields.push(FormatField { name: name.to_string(), offset, size });
        }
        Ok(Self { tracepoint: tracepoint.to_string(), fields })
    }

    pub fn field(&self, name: &str) -> Option<&FormatField> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of an optional field, [`ABSENT`] if this kernel lacks it.
    pub fn offset(&self, name: &str) -> u32 {
        self.field(name).map_or(ABSENT, |f| f.offset)
    }

    /// Offset of a field the program cannot work without.
    pub fn required(&self, name: &'static str) -> Result<u32, TracefsError> {
        self.field(name)
            .map(|f| f.offset)
            .ok_or_else(|| TracefsError::MissingField { tracepoint: self.tracepoint.clone(), field: name })
    }

    /// `tcp_event_sk` class records: `tcp_receive_reset`, `tcp_destroy_sock`.
    pub fn sk_tuple_fields(&self) -> Result<SkTupleFields, TracefsError> {
        Ok(SkTupleFields {
            skaddr: self.required("skaddr")?,
            sport: self.required("sport")?,
            dport: self.required("dport")?,
            family: self.offset("family"),
            saddr: self.offset("saddr"),
            daddr: self.offset("daddr"),
            saddr_v6: self.offset("saddr_v6"),
            daddr_v6: self.offset("daddr_v6"),
        })
    }

    /// `sock:inet_sock_set_state`.
    pub fn set_state_fields(&self) -> Result<SetStateFields, TracefsError> {
        let protocol = self
            .field("protocol")
            .ok_or_else(|| TracefsError::MissingField { tracepoint: self.tracepoint.clone(), field: "protocol" })?;
        Ok(SetStateFields {
            tuple: self.sk_tuple_fields()?,
            oldstate: self.required("oldstate")?,
            newstate: self.required("newstate")?,
            protocol: protocol.offset,
            protocol_size: protocol.size,
        })
    }

    /// `tcp:tcp_send_reset`, either layout (see [`SendResetFields`]).
    pub fn send_reset_fields(&self) -> Result<SendResetFields, TracefsError> {
        let skaddr = self.required("skaddr")?;
        let sockaddr_layout = self.field("saddr").is_some_and(|f| f.size >= 16);
        let tuple =
            if sockaddr_layout { SkTupleFields { skaddr, ..SkTupleFields::ABSENT } } else { self.sk_tuple_fields()? };
        Ok(SendResetFields {
            tuple,
            skbaddr: self.offset("skbaddr"),
            state: self.offset("state"),
            reason: self.offset("reason"),
            saddr_sockaddr: if sockaddr_layout { self.required("saddr")? } else { ABSENT },
            daddr_sockaddr: if sockaddr_layout { self.required("daddr")? } else { ABSENT },
        })
    }
}

/// The tracefs mount point, mounting tracefs if it is not mounted yet.
pub fn tracefs_root() -> Result<PathBuf, TracefsError> {
    if let Some(found) = TRACEFS_CANDIDATES.iter().map(Path::new).find(|p| p.join("events").is_dir()) {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(TRACEFS_CANDIDATES[0]);
    mount_tracefs(target).map_err(TracefsError::Mount)?;
    Ok(target.to_path_buf())
}

fn mount_tracefs(target: &Path) -> io::Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};
    let target = CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let fstype = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The layout of `category:name`, or `None` when this kernel has no such tracepoint.
pub fn read_format(root: &Path, category: &str, name: &str) -> Result<Option<EventFormat>, TracefsError> {
    let path = root.join("events").join(category).join(name).join("format");
    match fs::read_to_string(&path) {
        Ok(text) => EventFormat::parse(&format!("{category}:{name}"), &text).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TracefsError::Read { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 6.18 layouts are copied from this machine's format files; older ones are laid out from
    // those kernels' TP_STRUCT__entry declarations (common fields left out).
    const RECEIVE_RESET_6_18: &str = "name: tcp_receive_reset
ID: 1510
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:__u16 sport;	offset:16;	size:2;	signed:0;
	field:__u16 dport;	offset:18;	size:2;	signed:0;
	field:__u16 family;	offset:20;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:22;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:26;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:30;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:46;	size:16;	signed:0;
	field:__u64 sock_cookie;	offset:64;	size:8;	signed:0;

print fmt: \"family=%s sport=%hu\"";

    // 4.19 / 5.10: no `family` (added in 5.12), so everything after dport sits 2 bytes lower.
    const RECEIVE_RESET_5_10: &str = "format:
	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:__u16 sport;	offset:16;	size:2;	signed:0;
	field:__u16 dport;	offset:18;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:20;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:24;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:28;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:44;	size:16;	signed:0;
	field:__u64 sock_cookie;	offset:64;	size:8;	signed:0;";

    const SEND_RESET_6_18: &str = "format:
	field:const void * skbaddr;	offset:8;	size:8;	signed:0;
	field:const void * skaddr;	offset:16;	size:8;	signed:0;
	field:int state;	offset:24;	size:4;	signed:1;
	field:enum sk_rst_reason reason;	offset:28;	size:4;	signed:0;
	field:__u8 saddr[28];	offset:32;	size:28;	signed:0;
	field:__u8 daddr[28];	offset:60;	size:28;	signed:0;";

    // 6.1 (tcp_event_sk_skb class with state and family, no reason).
    const SEND_RESET_6_1: &str = "format:
	field:const void * skbaddr;	offset:8;	size:8;	signed:0;
	field:const void * skaddr;	offset:16;	size:8;	signed:0;
	field:int state;	offset:24;	size:4;	signed:1;
	field:__u16 sport;	offset:28;	size:2;	signed:0;
	field:__u16 dport;	offset:30;	size:2;	signed:0;
	field:__u16 family;	offset:32;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:34;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:38;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:42;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:58;	size:16;	signed:0;";

    const SET_STATE_6_18: &str = "format:
	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u16 protocol;	offset:30;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:32;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:36;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:40;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:56;	size:16;	signed:0;";

    // 4.19: `protocol` is a __u8 (before 5.6) and there is no family.
    const SET_STATE_4_19: &str = "format:
	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u8 protocol;	offset:28;	size:1;	signed:0;
	field:__u8 saddr[4];	offset:29;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:33;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:37;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:53;	size:16;	signed:0;";

    #[test]
    fn parses_field_names_offsets_and_sizes() {
        let f = EventFormat::parse("tcp:tcp_receive_reset", RECEIVE_RESET_6_18).unwrap();
        assert_eq!(f.field("skaddr"), Some(&FormatField { name: "skaddr".into(), offset: 8, size: 8 }));
        assert_eq!(f.field("saddr_v6").map(|f| (f.offset, f.size)), Some((30, 16)));
        assert_eq!(f.offset("sock_cookie"), 64);
        assert_eq!(f.offset("nonexistent"), ABSENT);
    }

    #[test]
    fn tuple_offsets_follow_the_family_field_change_in_5_12() {
        let new = EventFormat::parse("t", RECEIVE_RESET_6_18).unwrap().sk_tuple_fields().unwrap();
        let old = EventFormat::parse("t", RECEIVE_RESET_5_10).unwrap().sk_tuple_fields().unwrap();
        assert_eq!((new.family, new.saddr, new.daddr_v6), (20, 22, 46));
        assert_eq!((old.family, old.saddr, old.daddr_v6), (ABSENT, 20, 44));
    }

    #[test]
    fn send_reset_sockaddr_layout_since_6_10() {
        let f = EventFormat::parse("t", SEND_RESET_6_18).unwrap().send_reset_fields().unwrap();
        assert_eq!(f.tuple.skaddr, 16);
        assert_eq!((f.reason, f.state, f.saddr_sockaddr, f.daddr_sockaddr), (28, 24, 32, 60));
        assert_eq!(f.tuple.sport, ABSENT);
    }

    #[test]
    fn send_reset_split_layout_before_6_10_has_no_reason() {
        let f = EventFormat::parse("t", SEND_RESET_6_1).unwrap().send_reset_fields().unwrap();
        assert_eq!(f.reason, ABSENT);
        assert_eq!(f.saddr_sockaddr, ABSENT);
        assert_eq!((f.tuple.sport, f.tuple.family, f.tuple.saddr_v6), (28, 32, 42));
    }

    #[test]
    fn set_state_protocol_width_changes_in_5_6() {
        let new = EventFormat::parse("t", SET_STATE_6_18).unwrap().set_state_fields().unwrap();
        let old = EventFormat::parse("t", SET_STATE_4_19).unwrap().set_state_fields().unwrap();
        assert_eq!((new.protocol, new.protocol_size, new.tuple.family), (30, 2, 28));
        assert_eq!((old.protocol, old.protocol_size, old.tuple.family), (28, 1, ABSENT));
    }

    #[test]
    fn missing_required_field_names_tracepoint_and_field() {
        let err = EventFormat::parse(
            "tcp:tcp_receive_reset",
            "format:\n\tfield:__u16 sport;\toffset:16;\tsize:2;\tsigned:0;",
        )
        .unwrap()
        .sk_tuple_fields()
        .unwrap_err();
        assert_eq!(err.to_string(), "tracepoint tcp:tcp_receive_reset has no field `skaddr` on this kernel");
    }

    #[test]
    fn malformed_field_line_is_an_error() {
        assert!(EventFormat::parse("t", "\tfield:int x;\toffset:abc;\tsize:4;").is_err());
    }
}
