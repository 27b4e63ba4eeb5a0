//! The decision core: a request in, a decision out.
//!
//! It turns the caller's JSON into a Cedar request — entity uids, context and
//! request-scoped entities parsed against the schema, then Cedar's request
//! validation — evaluates it on a [`Bundle`], and returns the decision with its
//! diagnostics.
//!
//! It must never do I/O, know about HTTP or tokio, or read a clock. An input
//! the schema refuses is an [`InputError`] (the caller's fault, reported with
//! the field at fault); a problem while evaluating a policy is not an error:
//! it is reported in the decision's diagnostics, and Cedar fails closed.

use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request,
    RequestValidationError,
};
use serde::Deserialize;
use serde_json::Value;

use crate::policy::{cedar_message, Bundle};

/// The caller's input was refused. `path` names the field at fault, in the
/// caller's own vocabulary (`principal`, `context.mfa.age_seconds`,
/// `subject.type`, `evaluations[2].action.name`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InputError {
    /// A stable, machine-readable code (`invalid_entity_uid`, `unknown_action`, ...).
    pub code: &'static str,
    pub message: String,
    pub path: String,
}

impl InputError {
    pub fn new(code: &'static str, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            path: path.into(),
        }
    }

    /// The same error, its path placed under `prefix` (`requests[3]` + `principal`).
    pub fn under(mut self, prefix: &str) -> Self {
        self.path = if self.path.is_empty() {
            prefix.to_owned()
        } else {
            format!("{prefix}.{}", self.path)
        };
        self
    }
}

/// The body of `POST /v1/is_authorized` (and of each batch item, and of each
/// test case of `vigie test`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    pub principal: Value,
    pub action: Value,
    pub resource: Value,
    #[serde(default)]
    pub context: Option<Value>,
    #[serde(default)]
    pub entities: Option<Value>,
}

/// The field names an input error reports; AuthZEN speaks of `subject` where
/// the native API speaks of `principal`.
#[derive(Debug, Clone, Copy)]
pub struct Paths {
    pub principal: &'static str,
    pub action: &'static str,
    pub resource: &'static str,
    pub context: &'static str,
    pub entities: &'static str,
}

impl Paths {
    pub const NATIVE: Paths = Paths {
        principal: "principal",
        action: "action",
        resource: "resource",
        context: "context",
        entities: "entities",
    };
}

/// A request ready for evaluation: uids resolved, context and entities still
/// JSON (they are parsed against the schema of the request's action).
#[derive(Debug, Clone)]
pub struct Input {
    pub principal: EntityUid,
    pub action: EntityUid,
    pub resource: EntityUid,
    pub context: Value,
    /// Request-scoped entities (Cedar JSON), each with the path that names it
    /// in the caller's input, merged over the stored ones.
    pub entities: Vec<(String, Value)>,
    pub paths: Paths,
}

/// The answer, with Cedar's diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub allow: bool,
    /// Ids of the determining policies, sorted.
    pub reasons: Vec<String>,
    /// Policies that failed to evaluate (they count as not applying).
    pub errors: Vec<String>,
}

impl Query {
    /// Resolves the uids of a native query.
    pub fn into_input(self) -> Result<Input, InputError> {
        let paths = Paths::NATIVE;
        let entities = match self.entities {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("{}[{i}]", paths.entities), v))
                .collect(),
            Some(_) => {
                return Err(InputError::new(
                    "invalid_entities",
                    paths.entities,
                    "expected an array of entities in Cedar's JSON format",
                ))
            }
        };
        Ok(Input {
            principal: parse_uid(&self.principal)
                .map_err(|m| InputError::new("invalid_entity_uid", paths.principal, m))?,
            action: parse_uid(&self.action)
                .map_err(|m| InputError::new("invalid_entity_uid", paths.action, m))?,
            resource: parse_uid(&self.resource)
                .map_err(|m| InputError::new("invalid_entity_uid", paths.resource, m))?,
            context: self.context.unwrap_or(Value::Object(Default::default())),
            entities,
            paths,
        })
    }
}

/// Parses an entity uid in any of the forms callers use: the Cedar string
/// `NS::User::"alice"`, the object `{"type":"NS::User","id":"alice"}`, or the
/// escaped `{"__entity":{...}}`.
pub fn parse_uid(value: &Value) -> Result<EntityUid, String> {
    match value {
        Value::String(s) => match simple_uid(s) {
            // The common form, without Cedar's grammar (a parser per uid).
            Some((ty, id)) => uid(ty, id),
            None => EntityUid::from_str(s)
                .map_err(|e| format!("invalid entity uid `{s}`: {}", cedar_message(&e))),
        },
        Value::Object(map) => {
            if let Some(inner) = map.get("__entity") {
                return parse_uid(inner);
            }
            let ty = map
                .get("type")
                .and_then(Value::as_str)
                .ok_or("entity uid object needs a string `type`")?;
            let id = map
                .get("id")
                .and_then(Value::as_str)
                .ok_or("entity uid object needs a string `id`")?;
            if let Some(extra) = map.keys().find(|k| *k != "type" && *k != "id") {
                return Err(format!("unexpected key `{extra}` in entity uid"));
            }
            uid(ty, id)
        }
        _ => Err("expected an entity uid: `Type::\"id\"` or {\"type\":...,\"id\":...}".into()),
    }
}

/// `A::B::"id"` with plain identifiers and an id without escapes or quotes,
/// split into type and id; anything else is left to Cedar's parser.
fn simple_uid(s: &str) -> Option<(&str, &str)> {
    let (ty, rest) = s.split_once("::\"")?;
    let id = rest.strip_suffix('"')?;
    if id.contains(['"', '\\']) {
        return None;
    }
    let ident = |p: &str| {
        let mut c = p.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    ty.split("::").all(ident).then_some((ty, id))
}

thread_local! {
    /// Type names already parsed (Cedar parses them with its grammar).
    /// Bounded: input decides what is asked.
    static TYPES: std::cell::RefCell<std::collections::HashMap<String, EntityTypeName>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

fn type_name(ty: &str) -> Result<EntityTypeName, String> {
    if let Some(t) = TYPES.with(|t| t.borrow().get(ty).cloned()) {
        return Ok(t);
    }
    let name = EntityTypeName::from_str(ty)
        .map_err(|e| format!("invalid entity type `{ty}`: {}", cedar_message(&e)))?;
    TYPES.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() < 1024 {
            t.insert(ty.to_owned(), name.clone());
        }
    });
    Ok(name)
}

/// Builds a uid from a type name and an id.
pub fn uid(ty: &str, id: &str) -> Result<EntityUid, String> {
    let name = type_name(ty)?;
    // INVARIANT: `EntityId::from_str` accepts every string.
    let id = EntityId::new(id);
    Ok(EntityUid::from_type_name_and_id(name, id))
}

/// Evaluates requests on bundles. Cheap to share.
#[derive(Debug, Default)]
pub struct Engine {
    authorizer: Authorizer,
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates the input against the bundle's schema and evaluates it.
    pub fn decide(&self, bundle: &Bundle, input: Input) -> Result<Outcome, InputError> {
        let policies = bundle.slices.get(&input.action).unwrap_or(&bundle.policies);
        let (request, extra) = prepare(bundle, input)?;
        let response = match extra {
            None => self
                .authorizer
                .is_authorized(&request, policies, &bundle.entities),
            Some(entities) => self.authorizer.is_authorized(&request, policies, &entities),
        };
        let mut reasons: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        reasons.sort_unstable();
        let mut errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| cedar_message(e))
            .collect();
        errors.sort_unstable();
        Ok(Outcome {
            allow: response.decision() == Decision::Allow,
            reasons,
            errors,
        })
    }
}

/// Builds the Cedar request, and the entity set when the request brings its own.
fn prepare(bundle: &Bundle, input: Input) -> Result<(Request, Option<Entities>), InputError> {
    let schema = bundle.schema.as_ref();
    let paths = input.paths;
    if let Some(schema) = schema {
        if !schema.actions().any(|a| a == &input.action) {
            return Err(InputError::new(
                "unknown_action",
                paths.action,
                format!("action `{}` is not declared in the schema", input.action),
            ));
        }
    }
    if !input.context.is_object() {
        return Err(InputError::new(
            "invalid_context",
            paths.context,
            "expected a JSON object",
        ));
    }
    let action_name = input.action.to_string();
    let context_error = |raw: &Value, message: String| match bundle.shapes.locate(&action_name, raw)
    {
        Some((path, what)) => {
            let path = path.replacen("context", paths.context, 1);
            InputError::new("invalid_context", path.clone(), format!("`{path}`: {what}"))
        }
        None => InputError::new("invalid_context", paths.context, message),
    };
    // Fast path: built with the schema's types. Otherwise Cedar's parser,
    // which also gives the error messages. Request validation checks both.
    let fast = match schema {
        Some(_) => bundle.shapes.context(&action_name, &input.context),
        None => None,
    };
    let (context, raw_context) = match fast {
        Some(c) => (c, input.context),
        None => {
            let raw = input.context.clone();
            match Context::from_json_value(input.context, schema.map(|s| (s, &input.action))) {
                Ok(c) => (c, raw),
                Err(e) => return Err(context_error(&raw, cedar_message(&e))),
            }
        }
    };
    let request = Request::new(
        input.principal,
        input.action,
        input.resource,
        context,
        schema,
    )
    .map_err(|e| match e {
        RequestValidationError::InvalidContext(_) | RequestValidationError::TypeOfContext(_) => {
            context_error(&raw_context, cedar_message(&e))
        }
        e => request_error(&e, paths),
    })?;

    if input.entities.is_empty() {
        return Ok((request, None));
    }
    let mut parsed = Vec::with_capacity(input.entities.len());
    for (path, value) in input.entities {
        let entity = Entity::from_json_value(value, schema)
            .map_err(|e| InputError::new("invalid_entity", path, cedar_message(&e)))?;
        parsed.push(entity);
    }
    let merged = bundle
        .entities
        .clone()
        .upsert_entities(parsed, schema)
        .map_err(|e| InputError::new("invalid_entity", paths.entities, cedar_message(&e)))?;
    Ok((request, Some(merged)))
}

fn request_error(e: &RequestValidationError, paths: Paths) -> InputError {
    use RequestValidationError as E;
    let (code, path) = match e {
        E::UndeclaredAction(_) | E::ExternalAction(_) => ("unknown_action", paths.action),
        E::UndeclaredPrincipalType(_) => ("unknown_entity_type", paths.principal),
        E::UndeclaredResourceType(_) => ("unknown_entity_type", paths.resource),
        E::InvalidPrincipalType(_) => ("invalid_principal_type", paths.principal),
        E::InvalidResourceType(_) => ("invalid_resource_type", paths.resource),
        E::InvalidContext(_) | E::TypeOfContext(_) => ("invalid_context", paths.context),
        E::InvalidEnumEntity(_) => ("invalid_entity_uid", paths.principal),
        #[allow(unreachable_patterns)]
        _ => ("invalid_request", ""),
    };
    InputError::new(code, path, cedar_message(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn uid_forms_agree() {
        let a = parse_uid(&json!("Agency::User::\"alice\"")).unwrap();
        let b = parse_uid(&json!({"type": "Agency::User", "id": "alice"})).unwrap();
        let c = parse_uid(&json!({"__entity": {"type": "Agency::User", "id": "alice"}})).unwrap();
        assert_eq!(a, b);
        assert_eq!(b, c);
    }

    #[test]
    fn uid_errors_say_what_is_wrong() {
        assert!(parse_uid(&json!({"type": "User"}))
            .unwrap_err()
            .contains("`id`"));
        assert!(parse_uid(&json!(3))
            .unwrap_err()
            .contains("expected an entity uid"));
        assert!(parse_uid(&json!("not a uid"))
            .unwrap_err()
            .contains("`not a uid`"));
        assert!(parse_uid(&json!({"type": "U", "id": "x", "role": 1}))
            .unwrap_err()
            .contains("`role`"));
    }

    #[test]
    fn the_fast_uid_path_agrees_with_cedars_parser() {
        for s in [
            "Agency::User::\"alice\"",
            "User::\"\"",
            "A::B::C::\"x y-z.é\"",
            "Agency::Action::\"read\"",
        ] {
            assert!(simple_uid(s).is_some(), "{s}");
            assert_eq!(
                parse_uid(&json!(s)).unwrap(),
                EntityUid::from_str(s).unwrap(),
                "{s}"
            );
        }
        for s in [
            "User::\"a\\\"b\"",
            "User :: \"a\"",
            "1User::\"a\"",
            "User::\"a\" ",
            "User::'a'",
        ] {
            assert!(simple_uid(s).is_none(), "{s}");
        }
        assert!(
            parse_uid(&json!("User::\"a\\\"b\"")).is_ok(),
            "escapes go to Cedar's parser"
        );
        assert!(parse_uid(&json!("1User::\"a\"")).is_err());
    }

    #[test]
    fn ids_with_odd_characters_survive() {
        let u = parse_uid(&json!({"type": "User", "id": "a\"b\nc"})).unwrap();
        assert_eq!(u.id().unescaped(), "a\"b\nc");
    }
}
