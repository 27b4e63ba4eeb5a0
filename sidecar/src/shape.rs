//! Context shapes from the schema, for two jobs:
//!
//! * saying *where* a request's context is wrong (`context.mfa.age_seconds`)
//!   when Cedar has refused it;
//! * building the Cedar context straight from the JSON with the types known
//!   (`"10.0.0.1"` declared `ipaddr` becomes `ip("10.0.0.1")`), which is several
//!   times cheaper than Cedar's generic JSON parser.
//!
//! Cedar remains the judge of validity: this module never accepts or refuses
//! anything. A context it cannot build goes to Cedar's parser, and the built
//! one is still checked by Cedar's request validation. It reads the schema in
//! Cedar's JSON format (a `.cedarschema` is converted to it).

use std::collections::HashMap;

use cedar_policy::{Context, RestrictedExpression};
use serde_json::{Map, Value};

/// The context type of each action, with common types resolved on demand.
#[derive(Debug, Default, Clone)]
pub struct Shapes {
    /// `Agency::Action::"read"` → its context type (JSON schema form).
    contexts: HashMap<String, Value>,
    /// Common types by qualified name (`Agency::Mfa`) and, within the
    /// namespace, by bare name.
    common: HashMap<String, Value>,
}

impl Shapes {
    /// Reads the JSON form of a schema: `{ "<namespace>": { "commonTypes",
    /// "entityTypes", "actions" } }`.
    pub fn from_schema_json(schema: &Value) -> Shapes {
        let mut shapes = Shapes::default();
        let Some(namespaces) = schema.as_object() else {
            return shapes;
        };
        for (ns, body) in namespaces {
            let qualify = |name: &str| {
                if ns.is_empty() {
                    name.to_owned()
                } else {
                    format!("{ns}::{name}")
                }
            };
            if let Some(common) = body.get("commonTypes").and_then(Value::as_object) {
                for (name, ty) in common {
                    shapes.common.insert(qualify(name), ty.clone());
                    shapes
                        .common
                        .entry(name.clone())
                        .or_insert_with(|| ty.clone());
                }
            }
            if let Some(actions) = body.get("actions").and_then(Value::as_object) {
                for (name, action) in actions {
                    if let Some(ctx) = action.get("appliesTo").and_then(|a| a.get("context")) {
                        let uid = format!("{}::\"{}\"", qualify("Action"), escape(name));
                        shapes.contexts.insert(uid, ctx.clone());
                    }
                }
            }
        }
        shapes
    }

    /// The path of the first attribute of `context` that does not fit the
    /// context type of `action`, and what is wrong with it.
    pub fn locate(&self, action: &str, context: &Value) -> Option<(String, String)> {
        let ty = self.contexts.get(action)?;
        self.check(context, ty, "context".to_owned(), 0)
    }

    /// Whether `action`'s context type declares attribute `attr`.
    pub fn declares(&self, action: &str, attr: &str) -> bool {
        self.contexts
            .get(action)
            .and_then(|ty| self.resolve(ty))
            .and_then(|ty| ty.get("attributes"))
            .and_then(|attrs| attrs.get(attr))
            .is_some()
    }

    /// Where `value` does not fit the type of `context.<attr>` for `action`
    /// (`None` when it fits, or when nothing is known about it).
    pub fn check_attribute(
        &self,
        action: &str,
        attr: &str,
        value: &Value,
    ) -> Option<(String, String)> {
        let ty = self
            .contexts
            .get(action)
            .and_then(|ty| self.resolve(ty))?
            .get("attributes")?
            .get(attr)?;
        self.check(value, ty, format!("context.{attr}"), 0)
    }

    /// The Cedar context for `action`, built from JSON with the schema's
    /// types; `None` when anything is unexpected (let Cedar's parser say what).
    pub fn context(&self, action: &str, context: &Value) -> Option<Context> {
        let ty = self.resolve(self.contexts.get(action)?)?;
        let obj = context.as_object()?;
        let attrs = ty.get("attributes")?.as_object()?;
        let mut pairs = Vec::with_capacity(obj.len());
        for (key, value) in obj {
            pairs.push((key.clone(), self.build(value, attrs.get(key)?, 0)?));
        }
        Context::from_pairs(pairs).ok()
    }

    fn build(&self, value: &Value, ty: &Value, depth: usize) -> Option<RestrictedExpression> {
        if depth > 32 {
            return None;
        }
        let ty = self.resolve(ty)?;
        let kind = ty.get("type").and_then(Value::as_str)?;
        let name = ty.get("name").and_then(Value::as_str).unwrap_or("");
        match (kind, name) {
            ("Boolean", _) | ("EntityOrCommon", "Bool" | "Boolean") => {
                value.as_bool().map(RestrictedExpression::new_bool)
            }
            ("Long", _) | ("EntityOrCommon", "Long") => {
                value.as_i64().map(RestrictedExpression::new_long)
            }
            ("String", _) | ("EntityOrCommon", "String") => value
                .as_str()
                .map(|s| RestrictedExpression::new_string(s.to_owned())),
            ("Set", _) => {
                let element = ty.get("element")?;
                let items = value.as_array()?;
                let built: Option<Vec<_>> = items
                    .iter()
                    .map(|v| self.build(v, element, depth + 1))
                    .collect();
                built.map(RestrictedExpression::new_set)
            }
            ("Record", _) => {
                let obj = value.as_object()?;
                let attrs = ty.get("attributes")?.as_object()?;
                let mut fields = Vec::with_capacity(obj.len());
                for (k, v) in obj {
                    fields.push((k.clone(), self.build(v, attrs.get(k)?, depth + 1)?));
                }
                RestrictedExpression::new_record(fields).ok()
            }
            ("Extension", ext)
            | ("EntityOrCommon", ext @ ("ipaddr" | "decimal" | "datetime" | "duration")) => {
                let arg = match value {
                    Value::String(s) => s.as_str(),
                    Value::Object(o) => {
                        let e = o.get("__extn")?;
                        let func = e.get("fn")?.as_str()?;
                        let expected = match ext {
                            "ipaddr" => "ip",
                            other => other,
                        };
                        if func != expected || o.len() != 1 {
                            return None;
                        }
                        e.get("arg")?.as_str()?
                    }
                    _ => return None,
                };
                Some(match ext {
                    "ipaddr" => RestrictedExpression::new_ip(arg),
                    "decimal" => RestrictedExpression::new_decimal(arg),
                    "datetime" => RestrictedExpression::new_datetime(arg),
                    "duration" => RestrictedExpression::new_duration(arg),
                    _ => return None,
                })
            }
            // Entity references and anything else: Cedar's parser.
            _ => None,
        }
    }

    fn resolve<'a>(&'a self, ty: &'a Value) -> Option<&'a Value> {
        let mut ty = ty;
        for _ in 0..16 {
            let kind = ty.get("type").and_then(Value::as_str)?;
            let name = match kind {
                "EntityOrCommon" => ty.get("name").and_then(Value::as_str)?,
                "Boolean" | "Long" | "String" | "Set" | "Record" | "Entity" | "Extension" => {
                    return Some(ty)
                }
                other => other,
            };
            match self.common.get(name) {
                Some(next) => ty = next,
                // A builtin or an entity named through EntityOrCommon.
                None => return Some(ty),
            }
        }
        None
    }

    fn check(
        &self,
        value: &Value,
        ty: &Value,
        path: String,
        depth: usize,
    ) -> Option<(String, String)> {
        if depth > 32 {
            return None;
        }
        let ty = self.resolve(ty)?;
        let kind = ty.get("type").and_then(Value::as_str)?;
        let name = ty.get("name").and_then(Value::as_str).unwrap_or("");
        let wrong = |expected: &str| {
            Some((
                path.clone(),
                format!("expected {expected}, got {}", describe(value)),
            ))
        };
        match (kind, name) {
            ("Boolean", _) | ("EntityOrCommon", "Bool" | "Boolean") => {
                (!value.is_boolean()).then(|| wrong("a boolean")).flatten()
            }
            ("Long", _) | ("EntityOrCommon", "Long") => {
                (!value.is_i64()).then(|| wrong("an integer")).flatten()
            }
            ("String", _) | ("EntityOrCommon", "String") => {
                (!value.is_string()).then(|| wrong("a string")).flatten()
            }
            ("Set", _) => {
                let Some(items) = value.as_array() else {
                    return wrong("an array (a set)");
                };
                let element = ty.get("element")?;
                items
                    .iter()
                    .enumerate()
                    .find_map(|(i, v)| self.check(v, element, format!("{path}[{i}]"), depth + 1))
            }
            ("Record", _) => {
                let Some(obj) = value.as_object() else {
                    return wrong("an object (a record)");
                };
                self.check_record(obj, ty, &path, depth)
            }
            ("Extension", ext)
            | ("EntityOrCommon", ext @ ("ipaddr" | "decimal" | "datetime" | "duration")) => {
                check_extension(value, ext).map(|m| (path.clone(), m))
            }
            // Entity references: Cedar's message is precise enough.
            _ => None,
        }
    }

    fn check_record(
        &self,
        obj: &Map<String, Value>,
        ty: &Value,
        path: &str,
        depth: usize,
    ) -> Option<(String, String)> {
        let empty = Map::new();
        let attrs = ty
            .get("attributes")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let open = ty
            .get("additionalAttributes")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        for (key, value) in obj {
            match attrs.get(key) {
                Some(attr) => {
                    if let Some(found) = self.check(value, attr, format!("{path}.{key}"), depth + 1)
                    {
                        return Some(found);
                    }
                }
                None if !open => {
                    return Some((
                        format!("{path}.{key}"),
                        format!("attribute `{key}` is not declared in the schema"),
                    ))
                }
                None => {}
            }
        }
        attrs
            .iter()
            .find(|(key, attr)| {
                attr.get("required")
                    .and_then(Value::as_bool)
                    .unwrap_or(true)
                    && !obj.contains_key(*key)
            })
            .map(|(key, _)| {
                (
                    format!("{path}.{key}"),
                    format!("required attribute `{key}` is missing"),
                )
            })
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("`{n}`"),
        Value::String(s) => format!("`\"{s}\"`"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Whether an extension value looks right; the argument check is a cheap
/// approximation of Cedar's, used only to pick the path.
fn check_extension(value: &Value, ext: &str) -> Option<String> {
    let arg = match value {
        Value::String(s) => s.as_str(),
        Value::Object(o) => match o
            .get("__extn")
            .and_then(|e| e.get("arg"))
            .and_then(Value::as_str)
        {
            Some(a) => a,
            None => return Some(format!("expected a `{ext}` value")),
        },
        other => return Some(format!("expected a `{ext}` value, got {}", describe(other))),
    };
    let ok = match ext {
        "ipaddr" => {
            let addr = arg.split('/').next().unwrap_or("");
            addr.parse::<std::net::IpAddr>().is_ok()
        }
        "decimal" => {
            let (int, frac) = arg.split_once('.').unwrap_or((arg, ""));
            let int = int.strip_prefix('-').unwrap_or(int);
            !int.is_empty()
                && int.bytes().all(|b| b.is_ascii_digit())
                && (1..=4).contains(&frac.len())
                && frac.bytes().all(|b| b.is_ascii_digit())
        }
        _ => true,
    };
    (!ok).then(|| format!("`{arg}` is not a valid `{ext}`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shapes() -> Shapes {
        Shapes::from_schema_json(&json!({
            "NS": {
                "commonTypes": {
                    "Mfa": {"type": "Record", "attributes": {
                        "present": {"type": "Boolean"},
                        "age": {"type": "Long", "required": false}
                    }},
                    "Ctx": {"type": "Record", "attributes": {
                        "mfa": {"type": "EntityOrCommon", "name": "Mfa", "required": false},
                        "ip": {"type": "Extension", "name": "ipaddr", "required": false},
                        "tags": {"type": "Set", "element": {"type": "String"}, "required": false}
                    }}
                },
                "entityTypes": {},
                "actions": {"read": {"appliesTo": {"context": {"type": "Ctx"}}}}
            }
        }))
    }

    #[test]
    fn points_at_the_attribute() {
        let s = shapes();
        let a = "NS::Action::\"read\"";
        assert_eq!(s.locate(a, &json!({})), None);
        assert_eq!(
            s.locate(a, &json!({"mfa": {"present": 1}})).unwrap().0,
            "context.mfa.present"
        );
        assert_eq!(
            s.locate(a, &json!({"mfa": {}})).unwrap().0,
            "context.mfa.present"
        );
        assert_eq!(s.locate(a, &json!({"wifi": 1})).unwrap().0, "context.wifi");
        assert_eq!(s.locate(a, &json!({"ip": "x"})).unwrap().0, "context.ip");
        assert_eq!(s.locate(a, &json!({"ip": "10.0.0.0/8"})), None);
        assert_eq!(
            s.locate(a, &json!({"tags": ["a", 2]})).unwrap().0,
            "context.tags[1]"
        );
    }
}
