//! Write a Vigie context plugin as a plain Rust function.
//!
//! ```ignore
//! #![cfg_attr(target_arch = "wasm32", no_std)]
//! extern crate alloc;
//! use vigie_plugin::{json, Outcome, Request};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { office: alloc::string::String }
//!
//! fn check(request: &Request, config: &Config) -> Result<Outcome, String> {
//!     let ip = request.context_str("ip").unwrap_or("");
//!     Ok(Outcome::new(json!({ "office": ip.starts_with(&config.office) })))
//! }
//!
//! vigie_plugin::plugin!(check);
//! ```
//!
//! The function is ordinary Rust: unit-test it natively with `cargo test`
//! ([`Request::new`] builds a request). Built for `wasm32-wasip2`, the
//! [`plugin!`] macro turns it into a component implementing the world in
//! `sdk/wit/plugin.wit`: it parses the request's context and the plugin's
//! configuration from JSON, calls the function and serializes its answer.
//!
//! Plugins are `no_std` on WebAssembly (the standard library would import
//! WASI's environment, stdio and exit interfaces, which the sidecar refuses).
//! This crate supplies what `no_std` lacks there: an allocator (made for an
//! instance that lives for one call), and a panic
//! handler that sends the panic's message to the sidecar's log before
//! trapping. `alloc` (String, Vec, BTreeMap, format!) is available.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};

pub use serde_json::{json, Map, Value};

/// The request being decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Cedar entity uids in string form: `Agency::User::"alice"`.
    pub principal: String,
    pub action: String,
    pub resource: String,
    /// The caller's context (Cedar JSON), before any plugin ran.
    pub context: Map<String, Value>,
    /// The sidecar's clock, in milliseconds since the Unix epoch.
    pub now_unix_ms: i64,
}

impl Request {
    /// A request with an empty context at the Unix epoch, for tests.
    pub fn new(principal: &str, action: &str, resource: &str) -> Self {
        Request {
            principal: principal.into(),
            action: action.into(),
            resource: resource.into(),
            context: Map::new(),
            now_unix_ms: 0,
        }
    }

    /// The same request with this context (a JSON object; anything else
    /// gives an empty context).
    pub fn with_context(mut self, context: Value) -> Self {
        self.context = match context {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        self
    }

    /// The same request at this time (ms since the Unix epoch).
    pub fn at(mut self, now_unix_ms: i64) -> Self {
        self.now_unix_ms = now_unix_ms;
        self
    }

    /// The value at a dotted path of the context (`"device.token"`).
    pub fn context_value(&self, path: &str) -> Option<&Value> {
        let mut parts = path.split('.');
        let mut value = self.context.get(parts.next()?)?;
        for part in parts {
            value = value.get(part)?;
        }
        Some(value)
    }

    /// The string at a dotted path of the context. An extension value
    /// (`{"__extn": {"fn": "ip", "arg": "10.0.0.1"}}`) gives its argument.
    pub fn context_str(&self, path: &str) -> Option<&str> {
        let value = self.context_value(path)?;
        value
            .as_str()
            .or_else(|| value.get("__extn")?.get("arg")?.as_str())
    }

    /// The time as whole seconds since the Unix epoch.
    pub fn now_unix_seconds(&self) -> i64 {
        self.now_unix_ms.div_euclid(1000)
    }
}

/// What a plugin answers: the attributes for `context.<plugin name>`, and
/// how long a decision that used them may be cached.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub attributes: Map<String, Value>,
    /// `None`: no limit from this plugin; `Some(0)`: do not cache.
    pub ttl_ms: Option<u64>,
}

impl Outcome {
    /// Attributes from a JSON object (anything else gives no attributes,
    /// which the schema will refuse).
    pub fn new(attributes: Value) -> Self {
        Outcome {
            attributes: match attributes {
                Value::Object(map) => map,
                _ => Map::new(),
            },
            ttl_ms: None,
        }
    }

    /// Decisions using these attributes may be cached this long at most.
    pub fn cache_for_ms(mut self, ms: u64) -> Self {
        self.ttl_ms = Some(self.ttl_ms.map_or(ms, |t| t.min(ms)));
        self
    }

    /// Decisions using these attributes must not be cached.
    pub fn no_cache(self) -> Self {
        self.cache_for_ms(0)
    }
}

/// The sidecar's log, under the plugin's name. Natively (in tests) lines go
/// to stderr.
pub mod log {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::vigie::plugin::host::{log as host_log, Level};

    #[cfg(target_arch = "wasm32")]
    pub fn debug(message: &str) {
        host_log(Level::Debug, message)
    }
    #[cfg(target_arch = "wasm32")]
    pub fn info(message: &str) {
        host_log(Level::Info, message)
    }
    #[cfg(target_arch = "wasm32")]
    pub fn warn(message: &str) {
        host_log(Level::Warn, message)
    }
    #[cfg(target_arch = "wasm32")]
    pub fn error(message: &str) {
        host_log(Level::Error, message)
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn debug(message: &str) {
        std::eprintln!("[plugin debug] {message}")
    }
    #[cfg(not(target_arch = "wasm32"))]
    pub fn info(message: &str) {
        std::eprintln!("[plugin info] {message}")
    }
    #[cfg(not(target_arch = "wasm32"))]
    pub fn warn(message: &str) {
        std::eprintln!("[plugin warn] {message}")
    }
    #[cfg(not(target_arch = "wasm32"))]
    pub fn error(message: &str) {
        std::eprintln!("[plugin error] {message}")
    }
}

/// Runs a plugin function on the raw inputs of the WIT `check` call: what
/// [`plugin!`] expands to. Public for the macro and for tests that want to
/// exercise the JSON handling too.
pub fn run<C: serde::de::DeserializeOwned>(
    principal: String,
    action: String,
    resource: String,
    context: &str,
    now_unix_ms: i64,
    config: &str,
    check: fn(&Request, &C) -> Result<Outcome, String>,
) -> Result<(String, Option<u64>), String> {
    let context: Map<String, Value> = serde_json::from_str(context)
        .map_err(|e| format!("the request's context is not a JSON object: {e}"))?;
    let config: C = if config.trim().is_empty() {
        serde_json::from_str("{}")
    } else {
        serde_json::from_str(config)
    }
    .map_err(|e| format!("bad configuration: {e}"))?;
    let request = Request {
        principal,
        action,
        resource,
        context,
        now_unix_ms,
    };
    let outcome = check(&request, &config)?;
    Ok((
        Value::Object(outcome.attributes).to_string(),
        outcome.ttl_ms,
    ))
}

/// Turns `fn check(&Request, &Config) -> Result<Outcome, String>` (where
/// `Config: serde::Deserialize`) into the component's export. Does nothing
/// when not building for WebAssembly, so the crate still builds and tests
/// natively.
#[macro_export]
macro_rules! plugin {
    ($check:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct Plugin;
            impl $crate::bindings::Guest for Plugin {
                fn check(
                    request: $crate::bindings::vigie::plugin::types::Request,
                    config: $crate::__private::String,
                ) -> ::core::result::Result<
                    $crate::bindings::vigie::plugin::types::Outcome,
                    $crate::__private::String,
                > {
                    $crate::run(
                        request.principal,
                        request.action,
                        request.resource,
                        &request.context,
                        request.now_unix_ms,
                        &config,
                        $check,
                    )
                    .map(|(attributes, ttl_ms)| {
                        $crate::bindings::vigie::plugin::types::Outcome { attributes, ttl_ms }
                    })
                }
            }
    $crate::bindings::export!(Plugin with_types_in $crate::bindings);
        };
    };
}

#[doc(hidden)]
pub mod __private {
    pub use alloc::string::String;
}

/// The generated bindings of `sdk/wit/plugin.wit`.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        default_bindings_module: "vigie_plugin::bindings",
    });
}

// `memcmp`, `memcpy` and friends, which `core` expects from a C library:
// take them from the target's own libc (the `self-contained` one that ships
// with the wasm32-wasip2 target). Only those pure functions are linked in,
// never anything that would import WASI.
#[cfg(target_arch = "wasm32")]
#[link(name = "c")]
extern "C" {}

/// The canonical ABI's allocator hook: the host calls it to place the
/// arguments of `check` (and the plugin's bindings use it for its results).
/// On wasm32-wasip2, wit-bindgen expects the C library to provide it; here it
/// must use Rust's allocator, which frees those strings.
#[cfg(target_arch = "wasm32")]
#[no_mangle]
#[allow(unsafe_code)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{alloc, realloc, Layout};
    if new_len == 0 {
        return align as *mut u8;
    }
    // SAFETY: the canonical ABI passes a power-of-two alignment, and either
    // old_len == 0 (a fresh allocation) or a block this allocator gave out
    // with that size and alignment.
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable();
    }
    ptr
}

/// The allocator, made for an instance that lives for one call: blocks come
/// from a bump pointer over the instance's memory, and freed blocks go to
/// a free list per power-of-two size class, to be reused by the next
/// allocation of that class (so a loop that allocates and frees runs in
/// constant memory). It starts at the end of the static data and uses the
/// memory the module starts with (2 MiB, see `.cargo/config.toml`) before
/// growing it, so a typical call never grows memory — growing is what costs
/// most when a fresh instance is set up.
#[cfg(target_arch = "wasm32")]
mod alloc_impl {
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::Cell;

    const PAGE: usize = 65_536;
    /// Size classes 2^4 .. 2^31.
    const CLASSES: usize = 28;

    pub struct Allocator {
        next: Cell<usize>,
        end: Cell<usize>,
        /// Head of each class's free list (0: empty); a free block holds
        /// the address of the next one.
        free: [Cell<usize>; CLASSES],
    }

    // SAFETY: a plugin instance runs on one thread (no wasm threads here).
    #[allow(unsafe_code)]
    unsafe impl Sync for Allocator {}

    #[allow(unsafe_code)]
    extern "C" {
        static __heap_base: u8;
    }

    /// The class of a layout, and the block size it stands for.
    fn class(layout: &Layout) -> Option<(usize, usize)> {
        let size = layout
            .size()
            .max(layout.align())
            .max(16)
            .checked_next_power_of_two()?;
        let index = size.trailing_zeros() as usize - 4;
        (index < CLASSES).then_some((index, size))
    }

    impl Allocator {
        pub const fn new() -> Self {
            Allocator {
                next: Cell::new(0),
                end: Cell::new(0),
                free: [const { Cell::new(0) }; CLASSES],
            }
        }

        fn bump(&self, size: usize, align: usize) -> *mut u8 {
            if self.next.get() == 0 {
                // Only the address of the linker's symbol is taken.
                self.next.set(core::ptr::addr_of!(__heap_base) as usize);
                self.end.set(core::arch::wasm32::memory_size(0) * PAGE);
            }
            let start = (self.next.get() + align - 1) & !(align - 1);
            let Some(new_next) = start.checked_add(size) else {
                return core::ptr::null_mut();
            };
            if new_next > self.end.get() {
                let pages = (new_next - self.end.get()).div_ceil(PAGE).max(16);
                if core::arch::wasm32::memory_grow(0, pages) == usize::MAX {
                    return core::ptr::null_mut();
                }
                self.end.set(self.end.get() + pages * PAGE);
            }
            self.next.set(new_next);
            start as *mut u8
        }
    }

    #[allow(unsafe_code)]
    unsafe impl GlobalAlloc for Allocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let Some((index, size)) = class(&layout) else {
                return core::ptr::null_mut();
            };
            let head = self.free[index].get();
            if head != 0 && head % layout.align() == 0 {
                // SAFETY: `head` is a free block of this class, which holds
                // the address of the next free block.
                self.free[index].set(unsafe { *(head as *const usize) });
                return head as *mut u8;
            }
            self.bump(size, layout.align().max(16))
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if let Some((index, _)) = class(&layout) {
                // SAFETY: the block is at least 16 bytes and ours again.
                unsafe { *(ptr as *mut usize) = self.free[index].get() };
                self.free[index].set(ptr as usize);
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY (all three): GlobalAlloc::realloc's contract — `layout`
            // describes `ptr`'s block and `new_size` is valid for its
            // alignment.
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            if class(&new_layout).map(|c| c.0) == class(&layout).map(|c| c.0) {
                return ptr;
            }
            let new = unsafe { self.alloc(new_layout) };
            if !new.is_null() {
                unsafe {
                    core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
            }
            new
        }
    }
}

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: alloc_impl::Allocator = alloc_impl::Allocator::new();

/// A panic is a fault of the plugin: say why in the sidecar's log, then
/// trap (the sidecar applies the plugin's failure mode).
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut message = info.message().to_string();
    if let Some(at) = info.location() {
        message = format!("panicked at {}:{}: {message}", at.file(), at.line());
    }
    log::error(&message);
    core::arch::wasm32::unreachable()
}

/// Compact JWS tokens (`header.payload.signature`, base64url), as used by
/// OIDC ID tokens and device-posture tokens. Verifying the signature is the
/// caller's business (it knows the algorithms and keys it accepts).
pub mod jws {
    use alloc::string::String;
    use alloc::vec::Vec;
    use base64::Engine as _;

    /// A token split and decoded, not yet verified.
    #[derive(Debug, Clone)]
    pub struct Token {
        pub header: serde_json::Map<String, serde_json::Value>,
        pub claims: serde_json::Map<String, serde_json::Value>,
        /// The bytes the signature covers: `header.payload` as sent.
        pub signed: Vec<u8>,
        pub signature: Vec<u8>,
    }

    impl Token {
        /// The header's `alg`.
        pub fn alg(&self) -> &str {
            self.header
                .get("alg")
                .and_then(|v| v.as_str())
                .unwrap_or("")
        }

        /// The header's `kid`.
        pub fn kid(&self) -> Option<&str> {
            self.header.get("kid").and_then(|v| v.as_str())
        }

        /// A numeric claim (`exp`, `iat`, ...).
        pub fn number(&self, claim: &str) -> Option<i64> {
            self.claims.get(claim).and_then(|v| v.as_i64())
        }
    }

    /// Decodes unpadded base64url.
    pub fn base64url(text: &str) -> Result<Vec<u8>, String> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|e| alloc::format!("bad base64url: {e}"))
    }

    /// Splits and decodes a compact JWS.
    pub fn parse(token: &str) -> Result<Token, String> {
        let mut parts = token.trim().split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS (three dot-separated parts)".into());
        };
        let object = |part: &str, what: &str| {
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&base64url(part)?)
                .map_err(|e| alloc::format!("the {what} is not a JSON object: {e}"))
        };
        let header = object(h, "header")?;
        let claims = object(p, "payload")?;
        let mut signed = Vec::with_capacity(h.len() + 1 + p.len());
        signed.extend_from_slice(h.as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(p.as_bytes());
        Ok(Token {
            header,
            claims,
            signed,
            signature: base64url(s)?,
        })
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (negative before).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DD` into days since the Unix epoch.
pub fn parse_date(text: &str) -> Option<i64> {
    let mut parts = text.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.get(..2)?.parse().ok()?;
    ((1..=12).contains(&m) && (1..=31).contains(&d)).then(|| days_from_civil(y, m, d))
}

/// Reads a typed configuration from a JSON value, naming the field at fault.
pub fn parse<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, String> {
    T::deserialize(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        suffix: String,
    }

    fn echo(request: &Request, config: &Config) -> Result<Outcome, String> {
        let ip = request.context_str("ip").ok_or("no ip")?;
        Ok(Outcome::new(json!({ "ip": format!("{ip}{}", config.suffix) })).cache_for_ms(5))
    }

    #[test]
    fn run_parses_and_serializes() {
        let ctx = r#"{"ip":{"__extn":{"fn":"ip","arg":"10.0.0.1"}}}"#;
        let (attrs, ttl) = run(
            "U::\"a\"".into(),
            "A::\"b\"".into(),
            "R::\"c\"".into(),
            ctx,
            7,
            r#"{"suffix":"/32"}"#,
            echo,
        )
        .unwrap();
        assert_eq!(attrs, r#"{"ip":"10.0.0.1/32"}"#);
        assert_eq!(ttl, Some(5));
    }

    #[test]
    fn errors_name_the_input() {
        let e = run("".into(), "".into(), "".into(), "[]", 0, "", echo).unwrap_err();
        assert!(e.contains("context is not a JSON object"), "{e}");
        let e = run(
            "".into(),
            "".into(),
            "".into(),
            "{}",
            0,
            "{\"suffix\":1}",
            echo,
        )
        .unwrap_err();
        assert!(e.starts_with("bad configuration"), "{e}");
        let e = run("".into(), "".into(), "".into(), "{}", 0, "", echo).unwrap_err();
        assert_eq!(e, "no ip");
    }

    #[test]
    fn dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(parse_date("2026-11-28"), Some(20_785));
        assert_eq!(parse_date("2026-13-01"), None);
        assert_eq!(parse_date("soon"), None);
    }

    #[test]
    fn jws_split() {
        // {"alg":"none"}.{"sub":"x"}.sig
        let t = jws::parse("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln").unwrap();
        assert_eq!(t.alg(), "none");
        assert_eq!(t.claims["sub"], "x");
        assert_eq!(t.signature, b"sig");
        assert_eq!(t.signed, b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0");
        assert!(jws::parse("a.b").is_err());
        assert!(jws::parse("!!.b.c").is_err());
    }

    #[test]
    fn ttl_keeps_the_shortest() {
        let o = Outcome::new(json!({}))
            .cache_for_ms(50)
            .cache_for_ms(10)
            .cache_for_ms(30);
        assert_eq!(o.ttl_ms, Some(10));
    }
}
