//! The only module with `unsafe`: SM2-with-SM3 signing and verification with the distinguishing ID set.
//!
//! The `openssl` crate has no way to set the SM2 distinguishing ID, and Debian's OpenSSL 3.0 defaults to an
//! EMPTY ID, which no GB/T 35276 or RFC 8998 peer uses. So this module follows the recipe of OpenSSL's own
//! `EVP_PKEY_CTX_set1_id(3)` manual page: a key context with the ID set, attached to a digest context with
//! `EVP_MD_CTX_set_pkey_ctx`, then `EVP_DigestSignInit`/`EVP_DigestVerifyInit` with `EVP_sm3()`.
//!
//! Soundness rests on one type, [`Sm2MdCtx`], which owns both contexts, frees them exactly once in the right
//! order, and is neither `Send` nor `Sync` (raw pointers), so it never crosses threads. Every function below
//! checks each OpenSSL return value and turns failures into [`SmError::OpenSsl`].
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void};
use std::ptr;

use foreign_types::{ForeignType, ForeignTypeRef};
use openssl::error::ErrorStack;
use openssl::pkey::{HasPublic, PKeyRef, Private};
use openssl::x509::{X509Req, X509};
use openssl_sys as sys;

use crate::error::SmError;
use crate::sm2::DistId;

// Functions of OpenSSL 3.0's libcrypto that openssl-sys 0.9 does not declare. Signatures from OpenSSL 3.0's
// <openssl/evp.h> and <openssl/x509.h>.
extern "C" {
    fn EVP_PKEY_CTX_set1_id(ctx: *mut sys::EVP_PKEY_CTX, id: *const c_void, len: c_int) -> c_int;
    fn EVP_MD_CTX_set_pkey_ctx(ctx: *mut sys::EVP_MD_CTX, pctx: *mut sys::EVP_PKEY_CTX);
    fn X509_sign_ctx(x: *mut sys::X509, ctx: *mut sys::EVP_MD_CTX) -> c_int;
    fn X509_REQ_sign_ctx(x: *mut sys::X509_REQ, ctx: *mut sys::EVP_MD_CTX) -> c_int;
    fn EVP_PKEY_is_a(pkey: *const sys::EVP_PKEY, name: *const c_char) -> c_int;
}

/// Whether OpenSSL treats `pkey` as an SM2 key (so that it signs SM2, not ECDSA). `EVP_PKEY_get_id` cannot
/// tell: OpenSSL 3.0 reports -1 for SM2 keys decoded from PEM or DER.
pub(crate) fn is_sm2<T>(pkey: &PKeyRef<T>) -> bool {
    // SAFETY: `pkey.as_ptr()` is a valid EVP_PKEY for the duration of the borrow; the name is a NUL-terminated
    // static string; EVP_PKEY_is_a only reads both.
    unsafe { EVP_PKEY_is_a(pkey.as_ptr(), c"SM2".as_ptr()) == 1 }
}

/// A digest context with an SM2 key context carrying the ID `1234567812345678`, initialised for signing or
/// verification with SM3.
///
/// Invariants: `md` and `pctx` are non-null and owned by this value; `md` refers to `pctx` (set with
/// `EVP_MD_CTX_set_pkey_ctx`, which marks `md` as NOT owning it), so `md` is freed before `pctx`.
struct Sm2MdCtx {
    md: *mut sys::EVP_MD_CTX,
    pctx: *mut sys::EVP_PKEY_CTX,
}

impl Drop for Sm2MdCtx {
    fn drop(&mut self) {
        // SAFETY: both pointers are owned by `self` (type invariant) and freed exactly once, here. `md` goes first:
        // it holds a borrowed reference to `pctx` (EVP_MD_CTX_FLAG_KEEP_PKEY_CTX, set by
        // `EVP_MD_CTX_set_pkey_ctx`), so freeing `md` does not free `pctx`, and `pctx` is still alive while `md`
        // is torn down. Both free functions accept NULL, though the invariant excludes it.
        unsafe {
            sys::EVP_MD_CTX_free(self.md);
            sys::EVP_PKEY_CTX_free(self.pctx);
        }
    }
}

/// Which operation to initialise.
#[derive(Clone, Copy)]
enum Op {
    Sign,
    Verify,
}

impl Sm2MdCtx {
    /// Builds the contexts for `pkey` (which must be an SM2 key: callers check [`is_sm2`]).
    fn new<T: HasPublic>(pkey: &PKeyRef<T>, op: Op, id: DistId) -> Result<Self, SmError> {
        let id = id.bytes();
        // SAFETY: `pkey.as_ptr()` is a valid EVP_PKEY for the duration of this borrow; EVP_PKEY_CTX_new takes its
        // own reference on it (EVP_PKEY_up_ref), so the context stays valid after the borrow ends. A NULL engine
        // is allowed.
        let pctx = unsafe { sys::EVP_PKEY_CTX_new(pkey.as_ptr(), ptr::null_mut()) };
        if pctx.is_null() {
            return Err(SmError::OpenSsl {
                op: "EVP_PKEY_CTX_new",
                source: ErrorStack::get(),
            });
        }
        // SAFETY: EVP_MD_CTX_new has no preconditions; NULL is checked below.
        let md = unsafe { sys::EVP_MD_CTX_new() };
        // From here on `ctx` owns both pointers, so every early return frees them (Drop handles a NULL `md`).
        let ctx = Sm2MdCtx { md, pctx };
        if md.is_null() {
            return Err(SmError::OpenSsl {
                op: "EVP_MD_CTX_new",
                source: ErrorStack::get(),
            });
        }
        // The IDs are 16 and 23 bytes long: the conversion cannot fail.
        let id_len = c_int::try_from(id.len()).unwrap_or(0);
        // SAFETY: `pctx` is valid (checked above). `set1` copies the ID (OpenSSL caches it until the signature
        // operation is initialised), so pointing at a `'static` byte string of exactly `id_len` bytes is enough.
        let rc = unsafe { EVP_PKEY_CTX_set1_id(pctx, id.as_ptr().cast(), id_len) };
        if rc <= 0 {
            return Err(SmError::OpenSsl {
                op: "EVP_PKEY_CTX_set1_id",
                source: ErrorStack::get(),
            });
        }
        // SAFETY: both pointers are valid. `md` does not take ownership of `pctx` (OpenSSL sets
        // EVP_MD_CTX_FLAG_KEEP_PKEY_CTX), which is why `Drop` frees `pctx` separately, after `md`.
        unsafe { EVP_MD_CTX_set_pkey_ctx(md, pctx) };
        // SAFETY: `md` is valid and carries `pctx`; EVP_sm3() returns a static method table; the out-parameter for
        // the key context may be NULL; a NULL engine is allowed; `pkey` is valid for the call (and matches the
        // key of `pctx`, being the same object).
        let rc = unsafe {
            match op {
                Op::Sign => sys::EVP_DigestSignInit(
                    md,
                    ptr::null_mut(),
                    sys::EVP_sm3(),
                    ptr::null_mut(),
                    pkey.as_ptr(),
                ),
                Op::Verify => sys::EVP_DigestVerifyInit(
                    md,
                    ptr::null_mut(),
                    sys::EVP_sm3(),
                    ptr::null_mut(),
                    pkey.as_ptr(),
                ),
            }
        };
        if rc <= 0 {
            let op = match op {
                Op::Sign => "EVP_DigestSignInit",
                Op::Verify => "EVP_DigestVerifyInit",
            };
            return Err(SmError::OpenSsl {
                op,
                source: ErrorStack::get(),
            });
        }
        Ok(ctx)
    }
}

/// SM2-with-SM3 signature (DER `SEQUENCE { r, s }`) of `msg` under `key`, with the distinguishing ID `id`.
pub(crate) fn sign(key: &PKeyRef<Private>, msg: &[u8], id: DistId) -> Result<Vec<u8>, SmError> {
    let ctx = Sm2MdCtx::new(key, Op::Sign, id)?;
    let mut sig_len: usize = 0;
    // SAFETY: `ctx.md` is initialised for signing; a NULL signature buffer asks for the maximum length, written to
    // `sig_len`, a valid `usize`; `msg` is readable for `msg.len()` bytes.
    let rc = unsafe { sys::EVP_DigestSign(ctx.md, ptr::null_mut(), &mut sig_len, ptr::null(), 0) };
    if rc <= 0 {
        return Err(SmError::OpenSsl {
            op: "EVP_DigestSign (length)",
            source: ErrorStack::get(),
        });
    }
    let mut sig = vec![0u8; sig_len];
    // SAFETY: `sig` is writable for `sig_len` bytes, which is the capacity passed in `sig_len`; OpenSSL writes at
    // most that many and stores the actual length back; `msg` is readable for `msg.len()` bytes.
    let rc = unsafe { sys::EVP_DigestSign(ctx.md, sig.as_mut_ptr(), &mut sig_len, msg.as_ptr(), msg.len()) };
    if rc <= 0 {
        return Err(SmError::OpenSsl {
            op: "EVP_DigestSign",
            source: ErrorStack::get(),
        });
    }
    sig.truncate(sig_len);
    Ok(sig)
}

/// Checks an SM2-with-SM3 signature of `msg` under `key`, with the distinguishing ID `id`.
pub(crate) fn verify<T: HasPublic>(
    key: &PKeyRef<T>,
    msg: &[u8],
    sig: &[u8],
    id: DistId,
) -> Result<(), SmError> {
    let ctx = Sm2MdCtx::new(key, Op::Verify, id)?;
    // SAFETY: `ctx.md` is initialised for verification; `sig` and `msg` are readable for their lengths.
    let rc = unsafe { sys::EVP_DigestVerify(ctx.md, sig.as_ptr(), sig.len(), msg.as_ptr(), msg.len()) };
    // Clear whatever a malformed signature left on this thread's error queue: it is reported as BadSignature.
    let _ = ErrorStack::get();
    if rc == 1 {
        Ok(())
    } else {
        Err(SmError::BadSignature {
            sig_len: sig.len(),
            msg_len: msg.len(),
            id: id.name(),
        })
    }
}

/// Signs a certificate (its TBS, algorithm identifiers and signature) with SM2-with-SM3, ID `1234567812345678`.
/// Takes the certificate by value: it is uniquely owned while OpenSSL writes into it.
pub(crate) fn sign_x509(cert: X509, key: &PKeyRef<Private>) -> Result<X509, SmError> {
    let ctx = Sm2MdCtx::new(key, Op::Sign, DistId::Standard)?;
    // SAFETY: `cert` is a valid X509 owned by this function (no other Rust reference to it exists, and the
    // builder that made it has been consumed), so OpenSSL may mutate it; `ctx.md` is initialised for signing.
    let rc = unsafe { X509_sign_ctx(cert.as_ptr(), ctx.md) };
    if rc <= 0 {
        return Err(SmError::OpenSsl {
            op: "X509_sign_ctx",
            source: ErrorStack::get(),
        });
    }
    Ok(cert)
}

/// Signs a certificate request with SM2-with-SM3, ID `1234567812345678`. Takes the request by value: it is
/// uniquely owned while OpenSSL writes into it.
pub(crate) fn sign_x509_req(req: X509Req, key: &PKeyRef<Private>) -> Result<X509Req, SmError> {
    let ctx = Sm2MdCtx::new(key, Op::Sign, DistId::Standard)?;
    // SAFETY: `req` is a valid X509_REQ owned by this function (no other reference exists), so OpenSSL may mutate
    // it; `ctx.md` is initialised for signing.
    let rc = unsafe { X509_REQ_sign_ctx(req.as_ptr(), ctx.md) };
    if rc <= 0 {
        return Err(SmError::OpenSsl {
            op: "X509_REQ_sign_ctx",
            source: ErrorStack::get(),
        });
    }
    Ok(req)
}
