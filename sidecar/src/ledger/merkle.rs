//! RFC 6962 Merkle tree hashing: leaf `SHA-256(0x00 || data)` (see
//! `audit::leaf_hash`), node `SHA-256(0x01 || left || right)`; the root of n
//! leaves splits at the largest power of two below n. A compact range (the
//! "frontier" of perfect subtrees) makes appending O(log n).

use sha2::{Digest, Sha256};

use crate::audit::Hash;

pub fn node(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Perfect subtrees covering the leaves so far, largest first: (size, hash).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier(pub Vec<(u64, Hash)>);

impl Frontier {
    pub fn push(&mut self, leaf: Hash) {
        let mut size = 1u64;
        let mut hash = leaf;
        while let Some((s, h)) = self.0.last() {
            if *s != size {
                break;
            }
            hash = node(h, &hash);
            size *= 2;
            self.0.pop();
        }
        self.0.push((size, hash));
    }

    pub fn size(&self) -> u64 {
        self.0.iter().map(|(s, _)| s).sum()
    }

    pub fn root(&self) -> Hash {
        let mut it = self.0.iter().rev();
        let Some((_, last)) = it.next() else {
            return empty_root();
        };
        it.fold(*last, |acc, (_, h)| node(h, &acc))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 40);
        for (s, h) in &self.0 {
            out.extend_from_slice(&s.to_be_bytes());
            out.extend_from_slice(h);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Frontier {
        Frontier(
            bytes
                .chunks_exact(40)
                .filter_map(|c| {
                    Some((
                        u64::from_be_bytes(c[..8].try_into().ok()?),
                        c[8..].try_into().ok()?,
                    ))
                })
                .collect(),
        )
    }
}

/// The root of `leaves` (MTH of RFC 6962, section 2.1).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The audit path of leaf `m` in `leaves` (RFC 6962, section 2.1.1).
pub fn inclusion_proof(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 || m >= n {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut p = inclusion_proof(m, &leaves[..k]);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(m - k, &leaves[k..]);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Checks an audit path (RFC 9162, section 2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s_n == 0 {
            return false;
        }
        if f_n % 2 == 1 || f_n == s_n {
            r = node(p, &r);
            while f_n % 2 == 0 && f_n != 0 {
                f_n >>= 1;
                s_n >>= 1;
            }
        } else {
            r = node(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::leaf_hash;

    #[test]
    fn frontier_agrees_with_the_recursive_root_and_proofs_verify() {
        let leaves: Vec<Hash> = (0..37u32).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        let mut f = Frontier::default();
        for (n, l) in leaves.iter().enumerate() {
            f.push(*l);
            assert_eq!(f.root(), root(&leaves[..=n]), "size {}", n + 1);
            assert_eq!(Frontier::decode(&f.encode()), f);
        }
        for size in [1usize, 2, 3, 7, 8, 37] {
            let r = root(&leaves[..size]);
            for m in 0..size {
                let p = inclusion_proof(m, &leaves[..size]);
                assert!(
                    verify_inclusion(m as u64, size as u64, &leaves[m], &p, &r),
                    "m {m} size {size}"
                );
                assert!(!verify_inclusion(
                    m as u64,
                    size as u64,
                    &leaf_hash(b"other"),
                    &p,
                    &r
                ));
            }
        }
    }
}
