//! Context shapes from the schema, for two jobs:
//!
//! * saying *where* a request's context is wrong (`context.mfa.age_seconds`)
//!   when Cedar has refused it;
//! * building the Cedar context straight from the JSON with the types known
//!   (`"10.0.0.1"` declared `ipaddr` becomes `ip("10.0.0.1")`), which is
//!   several times cheaper than Cedar's generic JSON parser followed by its
//!   request validation.
//!
//! The builder is strict: it returns a context only when every attribute is
//! declared, every required one is present and every value has its declared
//! type, which is what Cedar's request validation checks. Anything else —
//! a wrong type, an entity reference, an open record, a type this module
//! does not model — gives `None`, and the engine falls back to Cedar's parser
//! and validation, which also give the error messages. A differential test
//! (`engine::tests`) holds the two paths to the same contexts.
//!
//! It reads the schema in Cedar's JSON format (a `.cedarschema` is converted
//! to it) and resolves common types once, when the bundle loads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use cedar_policy::Context;
use cedar_policy_core::ast::{self, ExtensionFunction, Name, PartialValue, ValueKind};
use cedar_policy_core::extensions::Extensions;
use serde_json::{Map, Value};

/// A schema type with the common types resolved.
#[derive(Debug, Clone, PartialEq)]
enum Ty {
    Bool,
    Long,
    String,
    Set(Box<Ty>),
    Record {
        /// Attribute → (type, required).
        attrs: BTreeMap<String, (Ty, bool)>,
        open: bool,
    },
    Ext(Ext),
    /// An entity reference, or anything not modelled here: Cedar decides.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    Ip,
    Decimal,
    Datetime,
    Duration,
}

impl Ext {
    fn from_name(name: &str) -> Option<Ext> {
        Some(match name {
            "ipaddr" => Ext::Ip,
            "decimal" => Ext::Decimal,
            "datetime" => Ext::Datetime,
            "duration" => Ext::Duration,
            _ => return None,
        })
    }

    /// The schema's name for the type.
    fn type_name(self) -> &'static str {
        match self {
            Ext::Ip => "ipaddr",
            Ext::Decimal => "decimal",
            Ext::Datetime => "datetime",
            Ext::Duration => "duration",
        }
    }

    /// The constructor's name (`ip("10.0.0.1")`).
    fn function(self) -> &'static str {
        match self {
            Ext::Ip => "ip",
            other => other.type_name(),
        }
    }

    /// Cedar's constructor, looked up once: `RestrictedExpression::new_ip`
    /// parses the name `ip` with Cedar's grammar on every call.
    fn constructor(self) -> Option<&'static ExtensionFunction> {
        static FUNCTIONS: LazyLock<Vec<(Ext, &'static ExtensionFunction)>> = LazyLock::new(|| {
            [Ext::Ip, Ext::Decimal, Ext::Datetime, Ext::Duration]
                .into_iter()
                .filter_map(|e| {
                    let name = Name::from_str(e.function()).ok()?;
                    Some((e, Extensions::all_available().func(&name).ok()?))
                })
                .collect()
        });
        FUNCTIONS.iter().find(|(e, _)| *e == self).map(|(_, f)| *f)
    }
}

/// The context type of each action, compiled from the schema.
#[derive(Debug, Default, Clone)]
pub struct Shapes {
    /// `Agency::Action::"read"` → its context type.
    contexts: HashMap<String, Ty>,
    /// Entity types declared as enumerations (`enum [...]`): requests naming
    /// them go through Cedar's validation, which checks the id.
    enums: HashSet<String>,
}

/// The raw schema types a compilation resolves names against.
struct Names<'a> {
    /// Common types by qualified name (`Agency::Mfa`) and, within their
    /// namespace, by bare name.
    common: HashMap<String, &'a Value>,
    entities: HashSet<String>,
}

impl Shapes {
    /// Reads the JSON form of a schema: `{ "<namespace>": { "commonTypes",
    /// "entityTypes", "actions" } }`.
    pub fn from_schema_json(schema: &Value) -> Shapes {
        let mut shapes = Shapes::default();
        let Some(namespaces) = schema.as_object() else {
            return shapes;
        };
        let mut names = Names {
            common: HashMap::new(),
            entities: HashSet::new(),
        };
        let qualify = |ns: &str, name: &str| {
            if ns.is_empty() {
                name.to_owned()
            } else {
                format!("{ns}::{name}")
            }
        };
        for (ns, body) in namespaces {
            if let Some(common) = body.get("commonTypes").and_then(Value::as_object) {
                for (name, ty) in common {
                    names.common.insert(qualify(ns, name), ty);
                    names.common.entry(name.clone()).or_insert(ty);
                }
            }
            if let Some(types) = body.get("entityTypes").and_then(Value::as_object) {
                for (name, ty) in types {
                    names.entities.insert(qualify(ns, name));
                    names.entities.insert(name.clone());
                    if ty.get("enum").is_some() {
                        shapes.enums.insert(qualify(ns, name));
                    }
                }
            }
        }
        for (ns, body) in namespaces {
            if let Some(actions) = body.get("actions").and_then(Value::as_object) {
                for (name, action) in actions {
                    if let Some(ctx) = action.get("appliesTo").and_then(|a| a.get("context")) {
                        let uid = format!("{}::\"{}\"", qualify(ns, "Action"), escape(name));
                        shapes.contexts.insert(uid, names.compile(ctx, 0));
                    }
                }
            }
        }
        shapes
    }

    /// Whether entity type `ty` is an enumeration.
    pub fn is_enum(&self, ty: &str) -> bool {
        self.enums.contains(ty)
    }

    /// The path of the first attribute of `context` that does not fit the
    /// context type of `action`, and what is wrong with it.
    pub fn locate(&self, action: &str, context: &Value) -> Option<(String, String)> {
        let ty = self.contexts.get(action)?;
        check(context, ty, "context".to_owned(), 0)
    }

    fn attribute(&self, action: &str, attr: &str) -> Option<&Ty> {
        match self.contexts.get(action)? {
            Ty::Record { attrs, .. } => attrs.get(attr).map(|(ty, _)| ty),
            _ => None,
        }
    }

    /// Whether `action`'s context type declares attribute `attr`.
    pub fn declares(&self, action: &str, attr: &str) -> bool {
        self.attribute(action, attr).is_some()
    }

    /// Where `value` does not fit the type of `context.<attr>` for `action`
    /// (`None` when it fits, or when nothing is known about it).
    pub fn check_attribute(
        &self,
        action: &str,
        attr: &str,
        value: &Value,
    ) -> Option<(String, String)> {
        let ty = self.attribute(action, attr)?;
        check(value, ty, format!("context.{attr}"), 0)
    }

    /// The Cedar context for `action`, built from JSON and known to fit the
    /// schema's context type; `None` when it does not fit or cannot be
    /// decided here (then Cedar parses, validates, and says what is wrong).
    pub fn context(&self, action: &str, context: &Value) -> Option<Context> {
        let value = build(context, self.contexts.get(action)?, 0)?;
        match value.value {
            ValueKind::Record(attrs) => Some(Context::from(ast::Context::Value(attrs))),
            _ => None,
        }
    }
}

impl Names<'_> {
    fn compile(&self, ty: &Value, depth: usize) -> Ty {
        if depth > 32 {
            return Ty::Other;
        }
        let Some(kind) = ty.get("type").and_then(Value::as_str) else {
            return Ty::Other;
        };
        let named = |name: &str| -> Ty {
            // Common types first, then entity types, then the builtins: the
            // order in which Cedar resolves a name.
            if let Some(common) = self.common.get(name) {
                return self.compile(common, depth + 1);
            }
            if self.entities.contains(name) {
                return Ty::Other;
            }
            match name.strip_prefix("__cedar::").unwrap_or(name) {
                "Bool" | "Boolean" => Ty::Bool,
                "Long" => Ty::Long,
                "String" => Ty::String,
                other => Ext::from_name(other).map_or(Ty::Other, Ty::Ext),
            }
        };
        match kind {
            "Boolean" => Ty::Bool,
            "Long" => Ty::Long,
            "String" => Ty::String,
            "Set" => match ty.get("element") {
                Some(element) => Ty::Set(Box::new(self.compile(element, depth + 1))),
                None => Ty::Other,
            },
            "Record" => {
                let empty = Map::new();
                let attrs = ty
                    .get("attributes")
                    .and_then(Value::as_object)
                    .unwrap_or(&empty)
                    .iter()
                    .map(|(name, attr)| {
                        let required = attr.get("required").and_then(Value::as_bool);
                        (
                            name.clone(),
                            (self.compile(attr, depth + 1), required.unwrap_or(true)),
                        )
                    })
                    .collect();
                let open = ty
                    .get("additionalAttributes")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                Ty::Record { attrs, open }
            }
            "Extension" => ty
                .get("name")
                .and_then(Value::as_str)
                .and_then(Ext::from_name)
                .map_or(Ty::Other, Ty::Ext),
            "Entity" => Ty::Other,
            "EntityOrCommon" => match ty.get("name").and_then(Value::as_str) {
                Some(name) => named(name),
                None => Ty::Other,
            },
            // `{"type": "Mfa"}`: a common type named directly.
            other => named(other),
        }
    }
}

/// `value` as a Cedar value of type `ty`, or `None` when it does not fit.
fn build(value: &Value, ty: &Ty, depth: usize) -> Option<ast::Value> {
    if depth > 32 {
        return None;
    }
    match ty {
        Ty::Bool => value.as_bool().map(ast::Value::from),
        Ty::Long => value.as_i64().map(ast::Value::from),
        Ty::String => value.as_str().map(ast::Value::from),
        Ty::Set(element) => {
            let items = value.as_array()?;
            let mut built = Vec::with_capacity(items.len());
            for item in items {
                built.push(build(item, element, depth + 1)?);
            }
            Some(ast::Value::set(built, None))
        }
        Ty::Record { attrs, open } => {
            let obj = value.as_object()?;
            if *open {
                return None;
            }
            let mut fields = BTreeMap::new();
            // A JSON object's keys are distinct: every required attribute
            // is there when as many of them were met as the type has.
            let mut required = 0;
            for (key, value) in obj {
                let (ty, is_required) = attrs.get(key)?;
                required += usize::from(*is_required);
                fields.insert(key.as_str().into(), build(value, ty, depth + 1)?);
            }
            let all = attrs.values().filter(|(_, r)| *r).count();
            (required == all).then(|| ast::Value::record_arc(Arc::new(fields), None))
        }
        Ty::Ext(ext) => {
            let arg = match value {
                Value::String(s) => s.as_str(),
                Value::Object(o) => {
                    let e = o.get("__extn")?;
                    if o.len() != 1 || e.get("fn")?.as_str()? != ext.function() {
                        return None;
                    }
                    e.get("arg")?.as_str()?
                }
                _ => return None,
            };
            match ext.constructor()?.call(&[ast::Value::from(arg)]) {
                Ok(PartialValue::Value(v)) => Some(v),
                _ => None,
            }
        }
        Ty::Other => None,
    }
}

fn check(value: &Value, ty: &Ty, path: String, depth: usize) -> Option<(String, String)> {
    if depth > 32 {
        return None;
    }
    let wrong = |expected: &str| {
        Some((
            path.clone(),
            format!("expected {expected}, got {}", describe(value)),
        ))
    };
    match ty {
        Ty::Bool => (!value.is_boolean()).then(|| wrong("a boolean")).flatten(),
        Ty::Long => (!value.is_i64()).then(|| wrong("an integer")).flatten(),
        Ty::String => (!value.is_string()).then(|| wrong("a string")).flatten(),
        Ty::Set(element) => {
            let Some(items) = value.as_array() else {
                return wrong("an array (a set)");
            };
            items
                .iter()
                .enumerate()
                .find_map(|(i, v)| check(v, element, format!("{path}[{i}]"), depth + 1))
        }
        Ty::Record { attrs, open } => {
            let Some(obj) = value.as_object() else {
                return wrong("an object (a record)");
            };
            for (key, value) in obj {
                match attrs.get(key) {
                    Some((ty, _)) => {
                        if let Some(found) = check(value, ty, format!("{path}.{key}"), depth + 1) {
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
                .find(|(key, (_, required))| *required && !obj.contains_key(*key))
                .map(|(key, _)| {
                    (
                        format!("{path}.{key}"),
                        format!("required attribute `{key}` is missing"),
                    )
                })
        }
        Ty::Ext(ext) => check_extension(value, ext.type_name()).map(|m| (path.clone(), m)),
        // Entity references: Cedar's message is precise enough.
        Ty::Other => None,
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
