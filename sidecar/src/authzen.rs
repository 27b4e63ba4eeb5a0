//! The OpenID AuthZEN Authorization API 1.0, mapped onto Cedar.
//!
//! * `subject`/`resource` `type` is a Cedar entity type: an alias from the
//!   config, a qualified name (`Agency::User`), or a bare name resolved in the
//!   schema's namespace (`User` → `Agency::User`).
//! * `action.name` is the id of an action of the schema's namespace.
//! * `properties` fill in attributes for this request. By default stored
//!   attributes win over them (a caller must not grant itself a role); an
//!   entity that is neither stored nor given properties is left out, so Cedar
//!   sees a bare reference.
//! * an absent `context` is `{}`; `action.properties` are ignored (Cedar
//!   actions and their groups come from the schema).
//!
//! Like the engine, this module does no I/O: JSON in, [`Input`] out.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{Authzen as Config, Precedence};
use crate::engine::{self, Input, InputError, Paths};
use crate::policy::Bundle;

#[derive(Debug, Clone, Deserialize)]
pub struct Entity {
    #[serde(rename = "type")]
    pub ty: String,
    pub id: String,
    #[serde(default)]
    pub properties: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Action {
    pub name: String,
    #[serde(default)]
    pub properties: Option<Value>,
}

/// `POST /access/v1/evaluation`
#[derive(Debug, Clone, Deserialize)]
pub struct Evaluation {
    pub subject: Entity,
    pub action: Action,
    pub resource: Entity,
    #[serde(default)]
    pub context: Option<Value>,
}

/// One item of `evaluations`; what it gives replaces the default whole.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Item {
    #[serde(default)]
    pub subject: Option<Entity>,
    #[serde(default)]
    pub action: Option<Action>,
    #[serde(default)]
    pub resource: Option<Entity>,
    #[serde(default)]
    pub context: Option<Value>,
}

/// `POST /access/v1/evaluations`
#[derive(Debug, Clone, Deserialize)]
pub struct Evaluations {
    #[serde(flatten)]
    pub defaults: Item,
    #[serde(default)]
    pub evaluations: Option<Vec<Item>>,
    #[serde(default)]
    pub options: Option<Options>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Options {
    #[serde(default)]
    pub evaluations_semantic: Option<String>,
}

/// How a batch of evaluations is run (AuthZEN 1.0, section 7.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantic {
    ExecuteAll,
    DenyOnFirstDeny,
    PermitOnFirstPermit,
}

impl Semantic {
    pub fn parse(options: Option<&Options>) -> Result<Self, InputError> {
        match options.and_then(|o| o.evaluations_semantic.as_deref()) {
            None | Some("execute_all") => Ok(Self::ExecuteAll),
            Some("deny_on_first_deny") => Ok(Self::DenyOnFirstDeny),
            Some("permit_on_first_permit") => Ok(Self::PermitOnFirstPermit),
            Some(other) => Err(InputError::new(
                "invalid_option",
                "options.evaluations_semantic",
                format!(
                    "unknown evaluations_semantic `{other}` (expected execute_all, deny_on_first_deny or permit_on_first_permit)"
                ),
            )),
        }
    }

    /// Whether evaluation stops after an item with this decision.
    pub fn stops_after(self, allow: bool) -> bool {
        match self {
            Self::ExecuteAll => false,
            Self::DenyOnFirstDeny => !allow,
            Self::PermitOnFirstPermit => allow,
        }
    }
}

impl Item {
    /// The item with the request's defaults filled in where it is silent.
    pub fn over(self, defaults: &Item) -> Item {
        Item {
            subject: self.subject.or_else(|| defaults.subject.clone()),
            action: self.action.or_else(|| defaults.action.clone()),
            resource: self.resource.or_else(|| defaults.resource.clone()),
            context: self.context.or_else(|| defaults.context.clone()),
        }
    }

    pub fn complete(self) -> Result<Evaluation, InputError> {
        let missing = |field: &str| {
            InputError::new(
                "missing_field",
                field,
                format!("`{field}` is required (in the item or as a top-level default)"),
            )
        };
        Ok(Evaluation {
            subject: self.subject.ok_or_else(|| missing("subject"))?,
            action: self.action.ok_or_else(|| missing("action"))?,
            resource: self.resource.ok_or_else(|| missing("resource"))?,
            context: self.context,
        })
    }
}

const PATHS: Paths = Paths {
    principal: "subject",
    action: "action.name",
    resource: "resource",
    context: "context",
    entities: "properties",
};

/// Maps an evaluation onto the engine's input.
pub fn to_input(config: &Config, bundle: &Bundle, eval: Evaluation) -> Result<Input, InputError> {
    let ns = bundle.namespace.as_deref();
    let principal = entity_uid(config, ns, &eval.subject, "subject")?;
    let resource = entity_uid(config, ns, &eval.resource, "resource")?;
    let action_type = match ns {
        Some(ns) => format!("{ns}::Action"),
        None => "Action".to_owned(),
    };
    let action = engine::uid(&action_type, &eval.action.name)
        .map_err(|m| InputError::new("invalid_action", "action.name", m))?;
    let _ = eval.action.properties;

    let mut entities = Vec::new();
    for (entity, uid, path) in [
        (&eval.subject, &principal, "subject.properties"),
        (&eval.resource, &resource, "resource.properties"),
    ] {
        if let Some(props) = &entity.properties {
            entities.push((
                path.to_owned(),
                with_properties(config.properties, bundle, uid, props),
            ));
        }
    }
    Ok(Input::new(
        [principal, action, resource],
        eval.context.unwrap_or_else(|| Value::Object(Map::new())),
        entities,
        PATHS,
    ))
}

fn entity_uid(
    config: &Config,
    ns: Option<&str>,
    entity: &Entity,
    field: &str,
) -> Result<cedar_policy::EntityUid, InputError> {
    let ty = match config.aliases.get(&entity.ty) {
        Some(alias) => alias.clone(),
        None if entity.ty.contains("::") => entity.ty.clone(),
        None => match ns {
            Some(ns) => format!("{ns}::{}", entity.ty),
            None => entity.ty.clone(),
        },
    };
    engine::uid(&ty, &entity.id)
        .map_err(|m| InputError::new("invalid_entity_type", format!("{field}.type"), m))
}

/// The entity as this request sees it: its properties merged with what is
/// stored for it, the winner chosen by the configured precedence.
fn with_properties(
    precedence: Precedence,
    bundle: &Bundle,
    uid: &cedar_policy::EntityUid,
    props: &Map<String, Value>,
) -> Value {
    let uid_json = serde_json::json!({
        "type": uid.type_name().to_string(),
        "id": uid.id().unescaped(),
    });
    let stored = bundle
        .entities
        .get(uid)
        .and_then(|e| e.to_json_value().ok());
    let (mut attrs, parents, tags) = match stored {
        Some(Value::Object(mut stored)) => (
            match stored.remove("attrs") {
                Some(Value::Object(a)) => a,
                _ => Map::new(),
            },
            stored.remove("parents").unwrap_or(Value::Array(vec![])),
            stored.remove("tags"),
        ),
        _ => (Map::new(), Value::Array(vec![]), None),
    };
    for (k, v) in props {
        if precedence == Precedence::Request || !attrs.contains_key(k) {
            attrs.insert(k.clone(), v.clone());
        }
    }
    let mut out = serde_json::json!({ "uid": uid_json, "attrs": attrs, "parents": parents });
    if let (Some(tags), Some(obj)) = (tags, out.as_object_mut()) {
        obj.insert("tags".into(), tags);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semantics_stop_where_the_spec_says() {
        assert!(!Semantic::ExecuteAll.stops_after(false));
        assert!(Semantic::DenyOnFirstDeny.stops_after(false));
        assert!(!Semantic::DenyOnFirstDeny.stops_after(true));
        assert!(Semantic::PermitOnFirstPermit.stops_after(true));
        let bad = Options {
            evaluations_semantic: Some("first".into()),
        };
        assert_eq!(
            Semantic::parse(Some(&bad)).unwrap_err().path,
            "options.evaluations_semantic"
        );
    }

    #[test]
    fn items_replace_defaults_whole() {
        let defaults: Item = serde_json::from_value(serde_json::json!({
            "subject": {"type": "User", "id": "a", "properties": {"x": 1}},
            "action": {"name": "read"},
            "context": {"k": 1}
        }))
        .unwrap();
        let item: Item = serde_json::from_value(serde_json::json!({
            "subject": {"type": "User", "id": "b"},
            "resource": {"type": "Record", "id": "r"}
        }))
        .unwrap();
        let e = item.over(&defaults).complete().unwrap();
        assert_eq!(e.subject.id, "b");
        assert!(
            e.subject.properties.is_none(),
            "the item's subject replaces the default whole"
        );
        assert_eq!(e.action.name, "read");
        assert_eq!(e.context, Some(serde_json::json!({"k": 1})));
    }
}
