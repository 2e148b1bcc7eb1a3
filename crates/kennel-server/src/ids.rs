//! Ids for tasks and daemons: 32 hex digits laid out as a UUID version 7 (RFC 9562), so they
//! sort by creation time. Within one process they also increase strictly: ids made in the same
//! millisecond count up in the 12 bits after the version (the RFC's "fixed bit-length dedicated
//! counter" method), and a clock that steps back does not make an id sort before an older one.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The last id's millisecond and counter.
static LAST: Mutex<(u64, u16)> = Mutex::new((0, 0));

/// Largest value of the 12-bit counter.
const COUNTER_MAX: u16 = 0x0fff;

/// A new time-ordered id: `<48-bit ms><7><12-bit counter><variant 10><62 random bits>`, in
/// lowercase hex without dashes.
pub fn time_ordered() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (ms, counter) = {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let next = if now > last.0 {
            (now, 0)
        } else if last.1 < COUNTER_MAX {
            (last.0, last.1 + 1)
        } else {
            // 4,096 ids in one millisecond: borrow the next one.
            (last.0 + 1, 0)
        };
        *last = next;
        next
    };
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).unwrap_or_else(|e| panic!("the OS random source failed: {e}"));
    let rand_b = u64::from_be_bytes(random) & 0x3fff_ffff_ffff_ffff;
    let high = ((ms & 0xffff_ffff_ffff) << 16) | 0x7000 | u64::from(counter);
    let low = (0b10 << 62) | rand_b;
    format!("{high:016x}{low:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_version_7_and_strictly_increasing() {
        let ids: Vec<String> = (0..10_000).map(|_| time_ordered()).collect();
        for w in ids.windows(2) {
            assert!(w[0] < w[1], "{} then {}", w[0], w[1]);
        }
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(id
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
            assert_eq!(&id[12..13], "7", "version: {id}");
            assert!("89ab".contains(&id[16..17]), "variant: {id}");
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ms = u64::from_str_radix(&ids[0][..12], 16).unwrap();
        assert!(ms.abs_diff(now) < 60_000, "{ms} vs {now}");
    }
}
