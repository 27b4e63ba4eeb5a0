//! Canonical JSON: object keys sorted by their UTF-8 bytes, no insignificant
//! whitespace, strings escaped as serde_json escapes them, numbers as
//! serde_json prints them (Vigie writes integers only). Equal values always
//! give equal bytes; the decision log hashes these bytes, never a re-encoding.

use serde_json::Value;

/// Appends the canonical encoding of `v` to `out`.
pub fn write(v: &Value, out: &mut Vec<u8>) {
    write_masked(v, &[], out);
}

/// Appends a JSON string.
pub fn string(s: &str, out: &mut Vec<u8>) {
    // Serializing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends an unsigned integer.
pub fn uint(n: u64, out: &mut Vec<u8>) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{n}");
}

/// Appends an array of strings.
pub fn strings(items: &[String], out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(item, out);
    }
    out.push(b']');
}

/// Appends the canonical encoding of `v` with the values at `masks`
/// (dotted paths below `v`: `id_token`, `device.token`) replaced by
/// `"<masked>"`.
pub fn write_masked(v: &Value, masks: &[&str], out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            // Sorted as they are, without looking each key up again.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(k, out);
                out.push(b':');
                if masks.is_empty() {
                    write_masked(v, masks, out);
                } else if masks.iter().any(|m| m == k) {
                    string("<masked>", out);
                } else {
                    let below: Vec<&str> = masks
                        .iter()
                        .filter_map(|m| m.strip_prefix(k.as_str())?.strip_prefix('.'))
                        .collect();
                    write_masked(v, &below, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_masked(item, &[], out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// The canonical encoding of `v`.
pub fn to_vec(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn sorted_and_compact() {
        let v = json!({"b": [1, {"d": "é\n", "c": null}], "a": true});
        assert_eq!(
            String::from_utf8(super::to_vec(&v)).unwrap(),
            "{\"a\":true,\"b\":[1,{\"c\":null,\"d\":\"é\\n\"}]}"
        );
    }

    #[test]
    fn masks_replace_only_their_paths() {
        let v = json!({"t": "secret", "d": {"t": "x", "k": 1}, "dt": "keep", "l": [{"t": 1}]});
        let mut out = Vec::new();
        super::write_masked(&v, &["t", "d.k", "nothing.here"], &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"d\":{\"k\":\"<masked>\",\"t\":\"x\"},\"dt\":\"keep\",\"l\":[{\"t\":1}],\"t\":\"<masked>\"}"
        );
    }
}
