//! Money enters as USD decimals in the file and is integer nano-USD from then on.
//!
//! Going through `f64` arithmetic (`usd * 1e9`) would turn 0.15 into 149_999_999.99…
//! and drift over millions of requests, so the conversion reads the decimal digits
//! instead: `{}` prints the shortest string that round-trips to the same `f64`, which
//! for any price typed with at most 9 decimals is exactly what the operator wrote.

use sha2::{Digest, Sha256};

const NANOS_PER_USD: u64 = 1_000_000_000;

pub fn usd_to_nanousd(usd: f64) -> Result<u64, String> {
    if !usd.is_finite() {
        return Err(format!("{usd} is not a finite amount of USD"));
    }
    if usd == 0.0 {
        // Also catches -0.0, whose text starts with a minus sign.
        return Ok(0);
    }
    if usd < 0.0 {
        return Err(format!("{usd} is negative"));
    }
    // Display for f64 never uses exponent notation, so this is plain digits.
    let text = format!("{usd}");
    let (whole, frac) = text.split_once('.').unwrap_or((text.as_str(), ""));
    if frac.len() > 9 {
        return Err(format!(
            "{text} has more than 9 decimal places (finer than one nano-USD)"
        ));
    }
    let too_large = || format!("{text} USD is too large");
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let mut nanos: u64 = 0;
    for (i, c) in frac.bytes().enumerate() {
        let digit = u64::from(c.wrapping_sub(b'0'));
        if digit > 9 {
            return Err(format!("{text} is not a decimal number"));
        }
        nanos += digit * 10u64.pow(8 - i as u32);
    }
    whole
        .checked_mul(NANOS_PER_USD)
        .and_then(|n| n.checked_add(nanos))
        .ok_or_else(too_large)
}

/// The form keys are stored in: the file never holds a usable secret.
pub fn sha256_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}
