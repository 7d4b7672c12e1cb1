//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4),
//! pure: a lookup table of `size` slots (a prime) filled from the backends'
//! permutations, so every backend owns about `size / n` slots and removing
//! one backend only moves the connections that were on it.
//!
//! Backends are identified by a stable 64-bit name (the task ID), so every
//! node builds the same table from the same tasks and a client keeps its
//! backend whichever node it enters by.

use sha2::{Digest, Sha256};

/// Two independent hashes of a backend's name: where its permutation
/// starts, and its step.
fn offset_and_skip(name: u64, size: u64) -> (u64, u64) {
    let digest = Sha256::digest(name.to_le_bytes());
    let h1 = u64::from_le_bytes(digest[0..8].try_into().expect("reason: 8 bytes"));
    let h2 = u64::from_le_bytes(digest[8..16].try_into().expect("reason: 8 bytes"));
    (h1 % size, h2 % (size - 1) + 1)
}

/// The table: `size` slots, each holding an index into `names`. Empty when
/// there are no backends. `size` must be prime and larger than the number
/// of backends.
pub(crate) fn table(names: &[u64], size: u32) -> Vec<u32> {
    let size = u64::from(size);
    if names.is_empty() || size < 2 {
        return Vec::new();
    }
    let perms: Vec<(u64, u64)> = names.iter().map(|n| offset_and_skip(*n, size)).collect();
    let mut next = vec![0u64; names.len()];
    let mut slots = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            // Backend i takes the first slot of its permutation still free.
            let mut slot = (offset + next[i] * skip) % size;
            while slots[slot as usize] != u32::MAX {
                next[i] += 1;
                slot = (offset + next[i] * skip) % size;
            }
            slots[slot as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    slots
}

/// A table for the non-hashing algorithms: backend `i % n` in slot `i`, so
/// slot `counter % n` is round-robin and a random slot is uniform.
pub(crate) fn spread(n: usize, size: u32) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    (0..size as usize).map(|i| (i % n) as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u32 = mesh_common::lb::TABLE_SIZE;

    fn shares(t: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for s in t {
            c[*s as usize] += 1;
        }
        c
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        let names: Vec<u64> = (1..=10).map(|i| i * 7919).collect();
        let t = table(&names, SIZE);
        assert_eq!(t.len(), SIZE as usize);
        let c = shares(&t, names.len());
        let ideal = f64::from(SIZE) / 10.0;
        for share in c {
            assert!((share as f64 - ideal).abs() <= 2.0, "{share} vs {ideal}");
        }
        assert!(table(&[], SIZE).is_empty());
        assert_eq!(table(&[42], SIZE), vec![0; SIZE as usize]);
    }

    #[test]
    fn the_same_backends_give_the_same_table_in_any_order_of_building() {
        let a = table(&[3, 1, 2], SIZE);
        let b = table(&[3, 1, 2], SIZE);
        assert_eq!(a, b);
    }

    #[test]
    fn removing_a_backend_moves_only_its_own_slots_mostly() {
        let before_names: Vec<u64> = (1..=5).collect();
        let after_names: Vec<u64> = vec![1, 2, 4, 5];
        let before = table(&before_names, SIZE);
        let after = table(&after_names, SIZE);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| {
                let was = before_names[**b as usize];
                was != 3 && after_names[**a as usize] != was
            })
            .count();
        // The paper's bound: a small fraction of the other slots move.
        assert!(
            moved < (SIZE as usize) / 10,
            "{moved} slots of surviving backends moved"
        );
    }

    #[test]
    fn spread_is_round_robin() {
        let t = spread(3, 7);
        assert_eq!(t, vec![0, 1, 2, 0, 1, 2, 0]);
        assert!(spread(0, 7).is_empty());
    }
}
