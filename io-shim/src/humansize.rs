//! Numbers as kivaloo's flags take them: sizes (libcperciva's
//! `humansize_parse`): digits, an optional space, an optional SI prefix
//! (k, M, G, T, P, E: powers of 1000) and an optional `B`, e.g. `1000000`,
//! `64 MB`, `2G`; and kvlds's `-S` cost ratio.

/// Parses `s` as kvlds's `-S` (`kivaloo serve --storage-cost`): a finite,
/// non-negative number.
///
/// # Errors
/// A message for the operator otherwise.
pub fn parse_cost_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a non-negative number")),
    }
}

/// Parses `s` as a size in bytes.
///
/// # Errors
/// A message for the operator if `s` is not of that form or the size does
/// not fit in 64 bits.
pub fn parse_size_bytes(s: &str) -> Result<u64, String> {
    let bad =
        || format!("{s:?} is not a size (digits, then optionally k, M, G, T, P or E, then optionally B)");
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(bad());
    }
    let number: u64 = s[..digits_end].parse().map_err(|_| format!("{s:?} is too large"))?;
    let mut rest = &s[digits_end..];
    rest = rest.strip_prefix(' ').unwrap_or(rest);
    let mut power = 0;
    if let Some(c) = rest.chars().next() {
        if let Some(p) = "kMGTPE".find(c) {
            power = p as u32 + 1;
            rest = &rest[1..];
        }
    }
    rest = rest.strip_prefix('B').unwrap_or(rest);
    if !rest.is_empty() {
        return Err(bad());
    }
    1000u64
        .checked_pow(power)
        .and_then(|m| number.checked_mul(m))
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kivaloo_sizes() {
        assert_eq!(parse_size_bytes("0"), Ok(0));
        assert_eq!(parse_size_bytes("1234"), Ok(1234));
        assert_eq!(parse_size_bytes("1234B"), Ok(1234));
        assert_eq!(parse_size_bytes("64 MB"), Ok(64_000_000));
        assert_eq!(parse_size_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size_bytes("3kB"), Ok(3000));
        assert_eq!(parse_size_bytes("18E"), Ok(18_000_000_000_000_000_000));
        for bad in ["", "k", "12x", "1.5G", "-1", "12KB", "12 MBB", "19E", "99999999999999999999"] {
            assert!(parse_size_bytes(bad).is_err(), "{bad:?}");
        }
    }
}
