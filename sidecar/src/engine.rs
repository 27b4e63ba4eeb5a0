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
use std::sync::Arc;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request, RequestValidationError,
};
use cedar_policy_core::ast;
use cedar_policy_core::evaluator::Evaluator;
use cedar_policy_core::extensions::Extensions;
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
    /// The principal, action and resource as Cedar writes them
    /// (`Type::"id"`): for the cache key, the plugins and the record.
    /// INVARIANT: the text of the three uids above (a cached decision is
    /// found by it): build with [`Input::new`] or [`Query::into_input`].
    pub texts: [String; 3],
    /// Shared with the decision's record, which keeps the caller's context.
    pub context: Arc<Value>,
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

/// Policies ready for evaluation, split once into scope and clauses.
///
/// Cedar's `Authorizer` rebuilds every policy's condition (scope and
/// clauses, as one expression) for every request, then evaluates it through
/// its partial evaluator. A [`Rules`] evaluates with Cedar's semantics:
/// Deny if a forbid is satisfied (its ids are the reasons), else Allow if a
/// permit is (its ids), else Deny; a policy that fails to evaluate is not
/// satisfied and its error is reported. A differential test holds it to the
/// `Authorizer`.
///
/// Cedar's condition is `scope && clauses`, and a scope (`principal in X`,
/// `action in [..]`, `resource is T`, ...) cannot fail. So the scope is
/// checked here on the uids and the entity store, as Cedar's evaluator does:
/// a policy whose scope does not match is not satisfied and costs no
/// evaluation; one whose scope matches is what its when/unless clauses
/// give, which Cedar's `Evaluator` computes.
#[derive(Debug, Clone, Default)]
pub struct Rules(Vec<Rule>);

#[derive(Debug, Clone)]
struct Rule {
    policy: ast::Policy,
    id: String,
    forbid: bool,
    /// `None` when a part of the scope is of a kind not checked here (an
    /// unfilled slot, or the action scope cedar's `tolerant-ast` adds):
    /// Cedar's whole condition decides.
    scope: Option<Scope>,
    /// The when/unless clauses as one expression, without source locations
    /// (see [`unlocated`]); `None`: there are none.
    clauses: Option<ast::Expr>,
}

#[derive(Debug, Clone)]
struct Scope {
    principal: ast::PrincipalOrResourceConstraint,
    action: ast::ActionConstraint,
    resource: ast::PrincipalOrResourceConstraint,
}

impl Scope {
    /// A policy's scope, slots filled (a link's scope names its entities),
    /// if every part of it is of a kind [`Party`] checks.
    fn of(p: &ast::Policy) -> Option<Scope> {
        use ast::{EntityReference::Slot, PrincipalOrResourceConstraint as C};
        let principal = p.principal_constraint().into_inner();
        let resource = p.resource_constraint().into_inner();
        let filled = |c: &C| !matches!(c, C::In(Slot(_)) | C::Eq(Slot(_)) | C::IsIn(_, Slot(_)));
        #[allow(unreachable_patterns, reason = "cedar's `tolerant-ast` adds a variant")]
        let action = match p.action_constraint() {
            a @ (ast::ActionConstraint::Any
            | ast::ActionConstraint::Eq(_)
            | ast::ActionConstraint::In(_)) => a.clone(),
            _ => return None,
        };
        (filled(&principal) && filled(&resource)).then_some(Scope {
            principal,
            action,
            resource,
        })
    }
}

impl Rules {
    /// The policies given (static ones and template links).
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a cedar_policy::Policy>) -> Rules {
        let mut rules: Vec<Rule> = policies
            .into_iter()
            .map(|p| -> &ast::Policy { p.as_ref() })
            .map(|p| Rule {
                id: p.id().to_string(),
                forbid: p.effect() == ast::Effect::Forbid,
                scope: Scope::of(p),
                clauses: p.non_scope_constraints().map(unlocated),
                policy: p.clone(),
            })
            .collect();
        rules.sort_by(|a, b| a.id.cmp(&b.id));
        Rules(rules)
    }

    /// The policies' ids, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|r| r.id.as_str())
    }

    /// Evaluates every policy on `request`.
    fn authorize(&self, request: &Request, entities: &Entities) -> Outcome {
        let request: &ast::Request = request.as_ref();
        let eval = Evaluator::new(
            request.clone(),
            entities.as_ref(),
            Extensions::all_available(),
        );
        let entities = entities.as_ref();
        let parties = (
            Party::of(request.principal().uid(), entities),
            Party::of(request.action().uid(), entities),
            Party::of(request.resource().uid(), entities),
        );
        let (mut permits, mut forbids, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        for rule in &self.0 {
            let satisfied = match (&parties, &rule.scope) {
                ((Some(principal), Some(action), Some(resource)), Some(scope)) => {
                    let admitted = principal.admitted_by(&scope.principal)
                        && action.admitted_by_action(&scope.action)
                        && resource.admitted_by(&scope.resource);
                    match (admitted, &rule.clauses) {
                        (false, _) => continue,
                        (true, None) => Ok(true),
                        (true, Some(clauses)) => match eval.interpret(clauses, rule.policy.env()) {
                            Ok(v) => match v.value_kind() {
                                ast::ValueKind::Lit(ast::Literal::Bool(b)) => Ok(*b),
                                // Not a boolean: Cedar's own path gives the
                                // error it would give.
                                _ => eval.evaluate(&rule.policy),
                            },
                            // Cedar's own path again, on the policy as
                            // written: the error is the one it gives, with
                            // its source location.
                            Err(_) => eval.evaluate(&rule.policy),
                        },
                    }
                }
                // A uid not known (never so for a concrete request), or a
                // scope not checked here: Cedar's whole condition.
                _ => eval.evaluate(&rule.policy),
            };
            match satisfied {
                Ok(true) if rule.forbid => forbids.push(rule.id.clone()),
                Ok(true) => permits.push(rule.id.clone()),
                Ok(false) => {}
                Err(error) => {
                    let e = cedar_policy::AuthorizationError::from(
                        cedar_policy_core::authorizer::AuthorizationError::PolicyEvaluationError {
                            id: rule.policy.id().clone(),
                            error,
                        },
                    );
                    errors.push(cedar_message(&e));
                }
            }
        }
        errors.sort_unstable();
        // The rules are sorted by id, so the reasons are too.
        let (allow, reasons) = match (forbids.is_empty(), permits.is_empty()) {
            (false, _) => (false, forbids),
            (true, false) => (true, permits),
            (true, true) => (false, Vec::new()),
        };
        Outcome {
            allow,
            reasons,
            errors,
        }
    }
}

/// `expr` without its source locations, which only errors use.
///
/// Cedar's evaluator gives every value it computes the location of the
/// expression it came from: an `Arc` cloned and later dropped at every node
/// (about 3% of the samples with the cache off, `perf`, 32 connections). The
/// clauses are evaluated without them; a policy that fails is evaluated
/// again as written (see [`Rules::authorize`]), so its error is Cedar's.
fn unlocated(expr: &ast::Expr) -> ast::Expr {
    use ast::ExprKind as K;
    use cedar_policy_core::expr_builder::ExprBuilder as _;
    let b = ast::ExprBuilder::<()>::new;
    let each = |es: &[ast::Expr]| es.iter().map(unlocated).collect::<Vec<_>>();
    #[allow(unreachable_patterns, reason = "cedar's `tolerant-ast` adds a variant")]
    match expr.expr_kind() {
        K::Lit(l) => b().val(l.clone()),
        K::Var(v) => b().var(*v),
        K::Slot(s) => b().slot(*s),
        K::Unknown(u) => b().unknown(u.clone()),
        K::If {
            test_expr,
            then_expr,
            else_expr,
        } => b().ite(
            unlocated(test_expr),
            unlocated(then_expr),
            unlocated(else_expr),
        ),
        K::And { left, right } => b().and(unlocated(left), unlocated(right)),
        K::Or { left, right } => b().or(unlocated(left), unlocated(right)),
        K::UnaryApp { op, arg } => b().unary_app(*op, unlocated(arg)),
        K::BinaryApp { op, arg1, arg2 } => b().binary_app(*op, unlocated(arg1), unlocated(arg2)),
        K::ExtensionFunctionApp { fn_name, args } => {
            match b().call_extension_fn(fn_name.clone(), each(args)) {
                Ok(e) => e,
            }
        }
        K::GetAttr { expr, attr } => b().get_attr(unlocated(expr), attr.clone()),
        K::HasAttr { expr, attr } => b().has_attr(unlocated(expr), attr.clone()),
        K::ExtHasAttr { expr, attrs } => b().extended_has_attr(unlocated(expr), attrs.clone()),
        K::Like { expr, pattern } => b().like(unlocated(expr), pattern.clone()),
        K::Is { expr, entity_type } => b().is_entity_type(unlocated(expr), entity_type.clone()),
        K::Set(es) => b().set(each(es)),
        K::Record(fields) => {
            let fields = fields.iter().map(|(k, v)| (k.clone(), unlocated(v)));
            // The keys come from a map: there are no duplicates to refuse.
            b().record(fields).unwrap_or_else(|_| expr.clone())
        }
        _ => expr.clone(),
    }
}

/// Ancestors compared one by one, up to this many.
const FEW: usize = 8;

/// The request's principal or resource, looked up once for the scope
/// checks of every policy.
struct Party<'a> {
    uid: &'a ast::EntityUID,
    entity: Option<&'a ast::Entity>,
    /// The entity's ancestors, when there are at most [`FEW`]. Comparing
    /// a scope's target with each costs less than Cedar's
    /// `is_descendant_of`, which hashes the target (SipHash over its type
    /// and id) into two sets, once per policy: 2.5% of the samples with
    /// the cache off (`perf`, 32 connections).
    few: Option<[Option<&'a ast::EntityUID>; FEW]>,
}

impl<'a> Party<'a> {
    fn of(
        uid: Option<&'a ast::EntityUID>,
        entities: &'a cedar_policy_core::entities::Entities,
    ) -> Option<Party<'a>> {
        let uid = uid?;
        let entity = match entities.entity(uid) {
            cedar_policy_core::entities::Dereference::Data(e) => Some(e),
            _ => None,
        };
        let few = entity.and_then(|e| {
            let mut few = [None; FEW];
            let mut ancestors = e.ancestors();
            for slot in &mut few {
                *slot = ancestors.next();
            }
            ancestors.next().is_none().then_some(few)
        });
        Some(Party { uid, entity, few })
    }

    /// Whether the party is `target` or one of its descendants.
    fn is_in(&self, target: &ast::EntityUID) -> bool {
        self.uid == target
            || match &self.few {
                Some(few) => few.iter().map_while(|a| *a).any(|a| a == target),
                None => self.entity.is_some_and(|e| e.is_descendant_of(target)),
            }
    }

    /// Whether a scope constraint (`principal in X`, `resource is T`, ...)
    /// admits this party, as Cedar evaluates it: `in` is equality or
    /// ancestry in the entity store, and cannot fail.
    fn admitted_by(&self, scope: &ast::PrincipalOrResourceConstraint) -> bool {
        use ast::{EntityReference, PrincipalOrResourceConstraint as C};
        let is_in = |target: &EntityReference| match target {
            EntityReference::EUID(target) => self.is_in(target),
            // Not reached: see `Scope::of`.
            EntityReference::Slot(_) => false,
        };
        match scope {
            C::Any => true,
            C::Eq(EntityReference::EUID(target)) => self.uid == target.as_ref(),
            C::Eq(EntityReference::Slot(_)) => false,
            C::In(target) => is_in(target),
            C::Is(ty) => self.uid.entity_type() == ty.as_ref(),
            C::IsIn(ty, target) => self.uid.entity_type() == ty.as_ref() && is_in(target),
        }
    }

    /// The same for an action scope (`action == A`, `action in [A, B]`).
    fn admitted_by_action(&self, scope: &ast::ActionConstraint) -> bool {
        #[allow(unreachable_patterns, reason = "cedar's `tolerant-ast` adds a variant")]
        match scope {
            ast::ActionConstraint::Any => true,
            ast::ActionConstraint::Eq(target) => self.uid == target.as_ref(),
            ast::ActionConstraint::In(targets) => targets.iter().any(|t| self.is_in(t)),
            // Not reached: see `Scope::of`.
            _ => false,
        }
    }
}

impl Input {
    /// An input whose uids are written out by Cedar.
    pub fn new(
        [principal, action, resource]: [EntityUid; 3],
        context: Value,
        entities: Vec<(String, Value)>,
        paths: Paths,
    ) -> Input {
        let texts = [&principal, &action, &resource].map(ToString::to_string);
        Input {
            principal,
            action,
            resource,
            texts,
            context: Arc::new(context),
            entities,
            paths,
        }
    }
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
        let (principal, p) = parse_uid_text(self.principal)
            .map_err(|m| InputError::new("invalid_entity_uid", paths.principal, m))?;
        let (action, a) = parse_uid_text(self.action)
            .map_err(|m| InputError::new("invalid_entity_uid", paths.action, m))?;
        let (resource, r) = parse_uid_text(self.resource)
            .map_err(|m| InputError::new("invalid_entity_uid", paths.resource, m))?;
        Ok(Input {
            principal,
            action,
            resource,
            texts: [p, a, r],
            context: Arc::new(self.context.unwrap_or(Value::Object(Default::default()))),
            entities,
            paths,
        })
    }
}

/// [`parse_uid`], with the uid's text as Cedar writes it. The common form
/// is already that text when its id has nothing Cedar escapes: the string
/// is kept rather than written out again.
fn parse_uid_text(value: Value) -> Result<(EntityUid, String), String> {
    let parsed = match value {
        Value::String(s) => match simple_uid(&s) {
            Some((ty, id)) => {
                let parsed = uid(ty, id)?;
                // Printable ASCII but `'` (`"` and `\` are not simple):
                // what Cedar's `escape_debug` leaves as it is.
                if id.bytes().all(|b| matches!(b, b' '..=b'~' if b != b'\'')) {
                    return Ok((parsed, s));
                }
                parsed
            }
            None => parse_uid(&Value::String(s))?,
        },
        other => parse_uid(&other)?,
    };
    let text = parsed.to_string();
    Ok((parsed, text))
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
pub struct Engine {}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates the input against the bundle's schema and evaluates it.
    pub fn decide(&self, bundle: &Bundle, input: Input) -> Result<Outcome, InputError> {
        let rules = bundle.slices.get(&input.action).unwrap_or(&bundle.rules);
        let (request, extra) = prepare(bundle, input)?;
        Ok(rules.authorize(&request, extra.as_ref().unwrap_or(&bundle.entities)))
    }
}

/// Builds the Cedar request, and the entity set when the request brings its own.
///
/// With a schema there are two paths to the same request. The fast one: the
/// principal's and resource's types are among those the action applies to,
/// and the context, built with the schema's types, fits the action's context
/// type (see [`crate::shape`]); that is everything Cedar's request validation
/// checks, so it is not run a second time. Anything else takes Cedar's
/// path: its JSON parser and its validation, which also word the errors.
fn prepare(bundle: &Bundle, input: Input) -> Result<(Request, Option<Entities>), InputError> {
    let schema = bundle.schema.as_ref();
    let paths = input.paths;
    let action = match schema {
        Some(_) => match bundle.actions.get(&input.action) {
            Some(a) => Some(a),
            None => {
                return Err(InputError::new(
                    "unknown_action",
                    paths.action,
                    format!("action `{}` is not declared in the schema", input.action),
                ))
            }
        },
        None => None,
    };
    if !input.context.is_object() {
        return Err(InputError::new(
            "invalid_context",
            paths.context,
            "expected a JSON object",
        ));
    }
    let fast = action.and_then(|a| {
        let fits = a.principals.contains(input.principal.type_name())
            && a.resources.contains(input.resource.type_name());
        fits.then(|| bundle.shapes.context(&a.name, &input.context))
            .flatten()
    });
    let request = match fast {
        Some(context) => Request::new(input.principal, input.action, input.resource, context, None)
            .map_err(|e| request_error(&e, paths))?,
        None => validated_request(
            bundle,
            input.principal,
            input.action,
            input.resource,
            &input.context,
            paths,
        )?,
    };
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

/// Cedar's path: its JSON parser (with the schema's types) and its request
/// validation.
fn validated_request(
    bundle: &Bundle,
    principal: EntityUid,
    action: EntityUid,
    resource: EntityUid,
    context: &Value,
    paths: Paths,
) -> Result<Request, InputError> {
    let schema = bundle.schema.as_ref();
    let action_name = action.to_string();
    let context_error = |message: String| match bundle.shapes.locate(&action_name, context) {
        Some((path, what)) => {
            let path = path.replacen("context", paths.context, 1);
            InputError::new("invalid_context", path.clone(), format!("`{path}`: {what}"))
        }
        None => InputError::new("invalid_context", paths.context, message),
    };
    let parsed = Context::from_json_value(context.clone(), schema.map(|s| (s, &action)))
        .map_err(|e| context_error(cedar_message(&e)))?;
    Request::new(principal, action, resource, parsed, schema).map_err(|e| match e {
        RequestValidationError::InvalidContext(_) | RequestValidationError::TypeOfContext(_) => {
            context_error(cedar_message(&e))
        }
        e => request_error(&e, paths),
    })
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

    /// The text kept from the caller is the one Cedar would write: the
    /// record and the cache key do not depend on which path built it.
    #[test]
    fn a_kept_uid_text_is_cedars() {
        for s in [
            "Agency::User::\"alice\"",
            "User::\"\"",
            "User::\"x y-z.~!\"",
            "User::\"it's\"",
            "User::\"tab\there\"",
            "User::\"nul\u{0}\"",
            "User::\"é\"",
            "User::\"\u{301}accent\"",
            "User::\"zero\u{200b}width\"",
            "User::\"a\\\"b\"",
        ] {
            let (uid, text) = parse_uid_text(json!(s)).unwrap();
            assert_eq!(text, uid.to_string(), "{s:?}");
        }
        let (uid, text) = parse_uid_text(json!({"type": "User", "id": "it's"})).unwrap();
        assert_eq!(text, uid.to_string());
    }

    fn example() -> Bundle {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        crate::policy::load(&dir, crate::policy::Validation::Strict).unwrap()
    }

    /// Contexts for `read`: valid ones, and each kind of misfit.
    fn contexts() -> Vec<Value> {
        let mfa = json!({"present": true, "methods": ["otp", "pwd"], "age_seconds": 30, "hardware": false});
        let mut out = vec![
            json!({}),
            json!({"ip": "10.1.2.3"}),
            json!({"ip": "2001:db8::1"}),
            json!({"ip": "10.0.0.0/8"}),
            json!({"ip": {"__extn": {"fn": "ip", "arg": "192.168.0.1"}}}),
            json!({"ip": "10.1.2.3", "mfa": mfa.clone()}),
            json!({"mfa": {"present": false, "methods": [], "age_seconds": -1, "hardware": true,
                           "acr": "eidas-high", "verified": true, "problem": ""}}),
            json!({"network": {"zone": "vpn", "country": "FR", "eu": true},
                   "hours": {"open": true}, "device": {"managed": true, "encrypted": false, "patched": true}}),
            json!({"now": "2026-11-28T12:00:00Z", "risk": "0.25"}),
            json!({"now": {"__extn": {"fn": "datetime", "arg": "2026-11-28"}}, "risk": "1.0"}),
            json!({"id_token": "a.b.c", "device_token": ""}),
            json!({"mfa": {"present": true, "methods": ["otp", "otp"], "age_seconds": 1, "hardware": false}}),
            // Misfits.
            json!({"ip": "not an address"}),
            json!({"ip": 3}),
            json!({"ip": {"__extn": {"fn": "decimal", "arg": "1.0"}}}),
            json!({"ip": {"__extn": {"fn": "ip", "arg": "10.0.0.1"}, "x": 1}}),
            json!({"risk": "0.12345"}),
            json!({"risk": 0.5}),
            json!({"now": "yesterday"}),
            json!({"wifi": true}),
            json!({"mfa": {"present": true}}),
            json!({"mfa": {"present": "yes", "methods": [], "age_seconds": 1, "hardware": false}}),
            json!({"mfa": {"present": true, "methods": ["otp", 1], "age_seconds": 1, "hardware": false}}),
            json!({"mfa": {"present": true, "methods": "otp", "age_seconds": 1, "hardware": false}}),
            json!({"mfa": {"present": true, "methods": [], "age_seconds": 1.5, "hardware": false}}),
            json!({"mfa": {"present": true, "methods": [], "age_seconds": 18446744073709551615u64, "hardware": false}}),
            json!({"mfa": {"present": true, "methods": [], "age_seconds": 1, "hardware": false, "extra": 1}}),
            json!({"network": {"zone": "vpn", "country": "FR"}}),
            json!({"hours": null}),
            json!({"device": {"__entity": {"type": "Agency::User", "id": "alice"}}}),
            json!({"id_token": {"__entity": {"type": "Agency::User", "id": "alice"}}}),
        ];
        // Each valid context with one attribute of the wrong type.
        for context in out.clone() {
            if let Some(obj) = context.as_object() {
                for key in obj.keys() {
                    let mut bad = obj.clone();
                    bad.insert(key.clone(), json!([1, 2]));
                    out.push(Value::Object(bad));
                }
            }
        }
        out
    }

    /// The fast path (context built with the schema's types, Cedar's
    /// validation skipped) agrees with Cedar's parser and validation: it
    /// builds a request only where Cedar accepts one, and the same one.
    #[test]
    fn the_fast_context_path_agrees_with_cedars_validation() {
        let bundle = example();
        let schema = bundle.schema.as_ref().unwrap();
        let alice = parse_uid(&json!("Agency::User::\"alice\"")).unwrap();
        let record = parse_uid(&json!("Agency::Record::\"health-001\"")).unwrap();
        let mut fast_built = 0;
        let system = parse_uid(&json!("Agency::System::\"payroll\"")).unwrap();
        for action in ["read", "export", "update", "administer"] {
            let record = if action == "administer" {
                &system
            } else {
                &record
            };
            let action = parse_uid(&json!(format!("Agency::Action::\"{action}\""))).unwrap();
            for context in contexts() {
                let name = action.to_string();
                let fast = bundle.shapes.context(&name, &context);
                let cedar = Context::from_json_value(context.clone(), Some((schema, &action)))
                    .ok()
                    .and_then(|c| {
                        Request::new(
                            alice.clone(),
                            action.clone(),
                            record.clone(),
                            c,
                            Some(schema),
                        )
                        .ok()
                    });
                match (&fast, &cedar) {
                    (Some(f), Some(c)) => {
                        assert_eq!(Some(f), c.context(), "{name} {context}");
                        fast_built += 1;
                    }
                    (Some(_), None) => {
                        panic!("fast path accepted what Cedar refuses: {name} {context}")
                    }
                    // Left to Cedar: correct, only slower.
                    (None, _) => {}
                }
            }
        }
        // The forms callers send are all built on the fast path (the first
        // twelve contexts, for each of the four actions).
        assert_eq!(fast_built, 12 * 4);
        // Through `decide`: the same answers either way.
        let engine = Engine::new();
        for context in contexts() {
            let input = |context: Value| {
                let read = parse_uid(&json!("Agency::Action::\"read\"")).unwrap();
                Input::new(
                    [alice.clone(), read, record.clone()],
                    context,
                    Vec::new(),
                    Paths::NATIVE,
                )
            };
            let decided = engine.decide(&bundle, input(context.clone()));
            let a = input(context.clone());
            let cedar = validated_request(
                &bundle,
                a.principal,
                a.action,
                a.resource,
                &a.context,
                Paths::NATIVE,
            );
            assert_eq!(decided.is_ok(), cedar.is_ok(), "{context}");
            if let (Err(d), Err(c)) = (&decided, &cedar) {
                assert_eq!(d, c, "same error either way: {context}");
            }
        }
        // A principal type the action does not apply to takes Cedar's path.
        let wrong = Input::new(
            [
                record.clone(),
                parse_uid(&json!("Agency::Action::\"read\"")).unwrap(),
                record.clone(),
            ],
            json!({}),
            Vec::new(),
            Paths::NATIVE,
        );
        assert_eq!(
            engine.decide(&bundle, wrong).unwrap_err().code,
            "invalid_principal_type"
        );
    }

    /// Cedar's `Authorizer`'s answer as an [`Outcome`] (reasons and errors
    /// sorted, as [`Rules`] gives them).
    fn cedars(theirs: &cedar_policy::Response) -> Outcome {
        let mut reasons: Vec<String> = theirs
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        reasons.sort();
        let mut errors: Vec<String> = theirs
            .diagnostics()
            .errors()
            .map(|e| cedar_message(e))
            .collect();
        errors.sort();
        Outcome {
            allow: theirs.decision() == cedar_policy::Decision::Allow,
            reasons,
            errors,
        }
    }

    /// Every kind of scope, outside the example: `==`, `in`, `is`, `is in`
    /// on principal and resource, action groups, template links, a policy
    /// without clauses and one whose clause errs, all unsliced and without
    /// a schema, against Cedar's `Authorizer`.
    #[test]
    fn scopes_are_checked_as_cedar_does() {
        let mut policies = cedar_policy::PolicySet::from_str(
            r#"
            permit (principal, action, resource);
            forbid (principal == U::"banned", action, resource);
            permit (principal in G::"staff", action in [Action::"read", Action::"all"], resource is R);
            permit (principal is U in G::"ops", action == Action::"write", resource is R in F::"shared");
            forbid (principal, action in Action::"all", resource) when { resource.locked };
            permit (principal == ?principal, action, resource in ?resource) when { true };
            "#,
        )
        .unwrap();
        let link = |id: &str, p: &str, r: &str| {
            let vals = [
                (
                    cedar_policy::SlotId::principal(),
                    parse_uid(&json!(p)).unwrap(),
                ),
                (
                    cedar_policy::SlotId::resource(),
                    parse_uid(&json!(r)).unwrap(),
                ),
            ];
            (
                id.to_owned(),
                vals.into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            )
        };
        for (id, vals) in [
            link("l1", "U::\"bob\"", "F::\"shared\""),
            link("l2", "U::\"eve\"", "R::\"x\""),
        ] {
            policies
                .link(
                    cedar_policy::PolicyId::new("policy5"),
                    cedar_policy::PolicyId::new(id),
                    vals,
                )
                .unwrap();
        }
        let entities = Entities::from_json_value(
            json!([
                {"uid": {"type": "U", "id": "alice"}, "attrs": {}, "parents": [{"type": "G", "id": "staff"}]},
                {"uid": {"type": "U", "id": "bob"}, "attrs": {}, "parents": [{"type": "G", "id": "ops"}]},
                {"uid": {"type": "G", "id": "ops"}, "attrs": {}, "parents": [{"type": "G", "id": "staff"}]},
                {"uid": {"type": "R", "id": "x"}, "attrs": {"locked": true}, "parents": [{"type": "F", "id": "shared"}]},
                {"uid": {"type": "R", "id": "y"}, "attrs": {"locked": false}, "parents": []},
                {"uid": {"type": "Action", "id": "read"}, "attrs": {}, "parents": [{"type": "Action", "id": "all"}]},
                {"uid": {"type": "Action", "id": "write"}, "attrs": {}, "parents": [{"type": "Action", "id": "all"}]}
            ]),
            None,
        )
        .unwrap();
        let rules = Rules::new(policies.policies());
        let authorizer = cedar_policy::Authorizer::new();
        let uids = |list: &[&str]| -> Vec<EntityUid> {
            list.iter().map(|u| parse_uid(&json!(u)).unwrap()).collect()
        };
        let principals = uids(&[
            "U::\"alice\"",
            "U::\"bob\"",
            "U::\"eve\"",
            "U::\"banned\"",
            "G::\"ops\"",
        ]);
        let actions = uids(&["Action::\"read\"", "Action::\"write\"", "Action::\"other\""]);
        let resources = uids(&["R::\"x\"", "R::\"y\"", "R::\"missing\"", "F::\"shared\""]);
        let mut allowed = 0;
        for principal in &principals {
            for action in &actions {
                for resource in &resources {
                    let request = Request::new(
                        principal.clone(),
                        action.clone(),
                        resource.clone(),
                        Context::empty(),
                        None,
                    )
                    .unwrap();
                    let ours = rules.authorize(&request, &entities);
                    assert_eq!(
                        ours,
                        cedars(&authorizer.is_authorized(&request, &policies, &entities)),
                        "{request}"
                    );
                    allowed += usize::from(ours.allow);
                }
            }
        }
        // Neither all nor nothing: the grid exercises both sides.
        assert!(allowed > 0 && allowed < principals.len() * actions.len() * resources.len());
    }

    /// The scope checks compare a few ancestors one by one and ask Cedar's
    /// entity for more: both agree with Cedar's authorizer.
    #[test]
    fn scope_checks_agree_with_cedar_within_and_past_few_ancestors() {
        let policies: cedar_policy::PolicySet = r#"
            permit(principal in G::"g0", action, resource) when { true };
            permit(principal in G::"g11", action, resource);
            permit(principal == U::"u", action in [Action::"b", Action::"a"], resource);
            forbid(principal in G::"none", action, resource);
        "#
        .parse()
        .unwrap();
        for n in [3, FEW, FEW + 4] {
            let parents: Vec<Value> = (0..n)
                .map(|i| json!({"type": "G", "id": format!("g{i}")}))
                .collect();
            let entities = cedar_policy::Entities::from_json_value(
                json!([{"uid": {"type": "U", "id": "u"}, "attrs": {}, "parents": parents}]),
                None,
            )
            .unwrap();
            let request = Request::new(
                r#"U::"u""#.parse().unwrap(),
                r#"Action::"a""#.parse().unwrap(),
                r#"R::"r""#.parse().unwrap(),
                Context::empty(),
                None,
            )
            .unwrap();
            let ours = Rules::new(policies.policies()).authorize(&request, &entities);
            let theirs = cedars(
                &cedar_policy::Authorizer::new().is_authorized(&request, &policies, &entities),
            );
            assert_eq!(ours, theirs, "{n} ancestors");
            assert_eq!(
                ours.reasons.len(),
                if n > 11 { 3 } else { 2 },
                "{n} ancestors"
            );
        }
    }

    /// The precompiled rules decide as Cedar's `Authorizer` does: same
    /// decision, same reasons, same errors, on every user, resource, action
    /// and context of the example (and on principals that do not exist,
    /// whose attributes fail to evaluate).
    #[test]
    fn rules_agree_with_cedars_authorizer() {
        let bundle = example();
        let schema = bundle.schema.as_ref().unwrap();
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/entities.json"),
        )
        .unwrap();
        let uids: Vec<EntityUid> = serde_json::from_str::<Vec<Value>>(&text)
            .unwrap()
            .iter()
            .map(|e| parse_uid(&e["uid"]).unwrap())
            .collect();
        let of = |ty: &str| -> Vec<EntityUid> {
            uids.iter()
                .filter(|u| u.type_name().to_string() == ty)
                .cloned()
                .collect()
        };
        let mut users = of("Agency::User");
        users.push(parse_uid(&json!("Agency::User::\"nobody\"")).unwrap());
        let contexts = [
            json!({}),
            json!({"ip": "10.1.2.3", "mfa": {"present": true, "methods": ["otp"], "age_seconds": 30, "hardware": true},
                   "network": {"zone": "on-premises", "country": "FR", "eu": true}}),
            json!({"ip": "203.0.113.7", "risk": "0.9"}),
            json!({"mfa": {"present": true, "methods": ["pwd"], "age_seconds": 4000, "hardware": false},
                   "network": {"zone": "internet", "country": "US", "eu": false},
                   "device": {"managed": false, "encrypted": true, "patched": true}}),
        ];
        let authorizer = cedar_policy::Authorizer::new();
        let (mut compared, mut allowed, mut erred) = (0, 0, 0);
        for action in schema.actions() {
            let Some(a) = bundle.actions.get(action) else {
                continue;
            };
            let resources: Vec<EntityUid> = a
                .resources
                .iter()
                .flat_map(|t| of(&t.to_string()))
                .chain([parse_uid(&json!("Agency::Record::\"missing\"")).unwrap()])
                .collect();
            for principal in &users {
                for resource in &resources {
                    if !a.resources.contains(resource.type_name()) {
                        continue;
                    }
                    for context in &contexts {
                        let c = Context::from_json_value(context.clone(), Some((schema, action)))
                            .unwrap();
                        let request = Request::new(
                            principal.clone(),
                            action.clone(),
                            resource.clone(),
                            c,
                            Some(schema),
                        )
                        .unwrap();
                        let expected = cedars(&authorizer.is_authorized(
                            &request,
                            &bundle.policies,
                            &bundle.entities,
                        ));
                        let rules = bundle.slices.get(action).unwrap_or(&bundle.rules);
                        assert_eq!(
                            rules.authorize(&request, &bundle.entities),
                            expected,
                            "{request}"
                        );
                        assert_eq!(
                            bundle.rules.authorize(&request, &bundle.entities),
                            expected,
                            "{request}"
                        );
                        compared += 1;
                        allowed += usize::from(expected.allow);
                        erred += usize::from(!expected.errors.is_empty());
                    }
                }
            }
        }
        assert!(
            compared > 500 && allowed > 20 && erred > 20,
            "{compared} {allowed} {erred}"
        );
    }

    #[test]
    fn clauses_lose_their_locations_and_nothing_else() {
        let policies = cedar_policy::PolicySet::from_str(
            r#"
            permit (principal, action, resource) when {
                (if context.n > 1 then -context.n else context.n * 2 - 1) <= 3 &&
                !(context.s like "a*b") && context.s != "x" &&
                (principal is U || principal is U in G::"g") && principal in [G::"g", G::"h"] &&
                context has a.b && context.a has b && [1, 2].contains(1) &&
                [1, 2].containsAll([1]) && [1].containsAny([3]) && !([].isEmpty()) &&
                {"k": 1, "l": [true]}.k == 1 && ip("10.0.0.1").isInRange(ip("10.0.0.0/8")) &&
                decimal("1.5").lessThan(decimal("2.0")) && principal.hasTag("t") &&
                principal.getTag("t") == "v"
            } unless { context.n >= 100 || context.n > 99 };
            forbid (principal, action, resource) when { context.n + 1 > 7 };
            "#,
        )
        .unwrap();
        for policy in policies.policies() {
            let p: &ast::Policy = policy.as_ref();
            let written = p.non_scope_constraints().unwrap();
            let bare = unlocated(written);
            assert_eq!(&bare, written, "{written}");
            assert_eq!(bare.to_string(), written.to_string());
            assert!(written.subexpressions().any(|e| e.source_loc().is_some()));
            assert!(bare.subexpressions().all(|e| e.source_loc().is_none()));
        }
        // A policy that fails is evaluated again as written: its error is
        // the one Cedar's authorizer gives.
        let rules = Rules::new(policies.policies());
        let request = |context: Value| {
            let uid = |t: &str| parse_uid(&json!({"type": t, "id": "x"})).unwrap();
            let context = Context::from_json_value(context, None).unwrap();
            Request::new(uid("U"), uid("Action"), uid("R"), context, None).unwrap()
        };
        let entities = Entities::empty();
        let authorizer = cedar_policy::Authorizer::new();
        for (context, failing) in [
            (json!({"n": 9223372036854775807_i64}), 2),
            (json!({"n": "text", "s": "ab"}), 2),
            (json!({"n": 2, "s": "ab", "a": {"b": 1}}), 0),
        ] {
            let request = request(context);
            let theirs = authorizer.is_authorized(&request, &policies, &entities);
            let ours = rules.authorize(&request, &entities);
            assert_eq!(ours, cedars(&theirs));
            assert_eq!(ours.errors.len(), failing, "{:?}", ours.errors);
        }
    }

    #[test]
    fn ids_with_odd_characters_survive() {
        let u = parse_uid(&json!({"type": "User", "id": "a\"b\nc"})).unwrap();
        assert_eq!(u.id().unescaped(), "a\"b\nc");
    }
}
