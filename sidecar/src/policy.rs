//! The policy directory: finds, parses and validates the schema, the policies,
//! the template links and the entities of one directory, and turns them into an
//! immutable [`Bundle`] — or into the list of every [`Problem`] found, each
//! naming its file, line and column.
//!
//! This module reads files and nothing else: it must never serve, cache or
//! half-apply a bundle. A bundle either loads whole or not at all.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    Entities, Entity, EntityTypeName, EntityUid, PolicyId, PolicySet, Schema, SlotId,
    ValidationMode, Validator,
};
use miette::Diagnostic;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How strictly policies and entities are checked against the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Validation {
    /// Cedar's strict validation (the default): policies must type-check
    /// exactly, entities and requests must conform to the schema.
    #[default]
    Strict,
    /// Cedar's permissive validation for policies; entities and requests
    /// still conform to the schema.
    Permissive,
    /// The schema is ignored: nothing is validated (a warning says so).
    Off,
}

/// One thing wrong (or worth a warning) in a policy directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Path relative to the policy directory.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every problem that kept a directory from loading.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// A loaded, validated policy directory. Immutable: a reload builds a new one.
pub struct Bundle {
    pub dir: PathBuf,
    pub policies: PolicySet,
    /// `None` when the directory has no schema or validation is `off`.
    pub schema: Option<Schema>,
    pub entities: Entities,
    /// SHA-256 (hex) over every file that went into the bundle.
    pub hash: String,
    /// The schema's namespace when it declares exactly one (AuthZEN types
    /// and action names are resolved in it).
    pub namespace: Option<String>,
    pub validation: Validation,
    /// For each action of the schema, only the policies whose action scope
    /// can match it (policy slicing: Cedar evaluates every policy it is
    /// given). Decisions and diagnostics are those of the whole set: a policy
    /// whose scope does not match is never satisfied and never errs.
    pub slices: HashMap<EntityUid, crate::engine::Rules>,
    /// Every policy, ready for evaluation (for an action without a slice).
    pub rules: crate::engine::Rules,
    /// Context types per action: the context is built with them, and they
    /// locate context errors precisely.
    pub shapes: crate::shape::Shapes,
    /// Every action of the schema, with the entity types it applies to.
    pub actions: HashMap<EntityUid, Action>,
    pub counts: Counts,
    pub warnings: Vec<Problem>,
    /// The plugins of `plugins.toml`, checked against the schema (compiled
    /// by [`crate::plugin::Host::load`]).
    pub plugins: Vec<crate::plugin::Spec>,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("dir", &self.dir)
            .field("hash", &self.hash)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    pub policies: usize,
    pub templates: usize,
    pub links: usize,
    pub entities: usize,
    pub plugins: usize,
}

/// A file read from the directory, kept whole so that byte offsets from
/// Cedar's diagnostics can be turned into lines and columns.
struct Source {
    rel: String,
    text: String,
}

impl Source {
    fn problem(&self, offset: Option<usize>, message: impl Into<String>) -> Problem {
        let (line, col) = line_col(&self.text, offset.unwrap_or(0));
        Problem {
            file: self.rel.clone(),
            line,
            col,
            message: message.into(),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// Flattens a Cedar diagnostic (and its related ones) into `(offset, message)`
/// pairs: the message joins the error, its causes and its help.
fn diagnostics(d: &dyn Diagnostic) -> Vec<(Option<usize>, String)> {
    let mut out = Vec::new();
    let mut message = error_chain(d);
    if let Some(help) = d.help() {
        message.push_str(&format!(" (help: {help})"));
    }
    let offset = d
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|l| l.offset());
    out.push((offset, message));
    if let Some(related) = d.related() {
        for r in related {
            out.extend(diagnostics(r));
        }
    }
    out
}

/// Message of a plain (non-miette) error with its causes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

/// Message of a Cedar error: its text, its causes and its help.
pub fn cedar_message(d: &dyn Diagnostic) -> String {
    diagnostics(d)
        .into_iter()
        .map(|(_, m)| m)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What the directory holds, before parsing.
#[derive(Default)]
struct Files {
    cedar: Vec<PathBuf>,
    schemas: Vec<PathBuf>,
    entities: Option<PathBuf>,
    links: Option<PathBuf>,
}

fn walk(dir: &Path, root: &Path, files: &mut Files) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if entry.file_type()?.is_dir() {
            walk(&path, root, files)?;
        } else if name.ends_with(".cedarschema") || name == "schema.cedar.json" {
            files.schemas.push(path);
        } else if name.ends_with(".cedar") {
            files.cedar.push(path);
        } else if dir == root && name == "entities.json" {
            files.entities = Some(path);
        } else if dir == root && name == "links.json" {
            files.links = Some(path);
        }
    }
    Ok(())
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Loads and validates the directory. On failure, every problem found is
/// returned, so `vigie check` can print them all at once.
pub fn load(dir: &Path, validation: Validation) -> Result<Bundle, Problems> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let dir_problem = |message: String| Problem {
        file: dir.display().to_string(),
        line: 1,
        col: 1,
        message,
    };

    let mut files = Files::default();
    if let Err(e) = walk(dir, dir, &mut files) {
        return Err(Problems(vec![dir_problem(format!(
            "cannot read policy directory: {e}"
        ))]));
    }

    let mut hasher = Sha256::new();
    let mut read = |path: &Path, problems: &mut Vec<Problem>| -> Option<Source> {
        let rel = relative(dir, path);
        match std::fs::read_to_string(path) {
            Ok(text) => {
                hasher.update((rel.len() as u64).to_le_bytes());
                hasher.update(rel.as_bytes());
                hasher.update((text.len() as u64).to_le_bytes());
                hasher.update(text.as_bytes());
                Some(Source { rel, text })
            }
            Err(e) => {
                problems.push(Problem {
                    file: rel,
                    line: 1,
                    col: 1,
                    message: format!("cannot read file: {e}"),
                });
                None
            }
        }
    };

    // The schema.
    let mut schema = None;
    let mut namespace = None;
    let mut shapes = crate::shape::Shapes::default();
    if files.schemas.len() > 1 {
        for path in &files.schemas {
            problems.push(Problem {
                file: relative(dir, path),
                line: 1,
                col: 1,
                message: format!(
                    "more than one schema in the directory ({} found); keep exactly one",
                    files.schemas.len()
                ),
            });
        }
    } else if let Some(path) = files.schemas.first() {
        if let Some(src) = read(path, &mut problems) {
            if validation == Validation::Off {
                warnings.push(src.problem(None, "validation is `off`: the schema is ignored"));
            } else {
                match parse_schema(&src, &mut warnings) {
                    Ok((s, ns, sh)) => {
                        schema = Some(s);
                        namespace = ns;
                        shapes = sh;
                    }
                    Err(mut p) => problems.append(&mut p),
                }
            }
        }
    } else {
        warnings.push(dir_problem(
            "no schema (`*.cedarschema` or `schema.cedar.json`): policies, entities and requests are not validated".into(),
        ));
    }

    // The policies and templates, renamed to their ids.
    let mut policies = PolicySet::new();
    // Which file (and offset) each policy id came from, for later diagnostics.
    let mut origin: HashMap<PolicyId, (usize, usize)> = HashMap::new();
    let mut sources: Vec<Source> = Vec::new();
    let mut counts = Counts::default();
    for path in &files.cedar {
        let Some(src) = read(path, &mut problems) else {
            continue;
        };
        let idx = sources.len();
        match PolicySet::from_str(&src.text) {
            Err(errs) => {
                for (offset, msg) in diagnostics(&errs) {
                    problems.push(src.problem(offset, msg));
                }
            }
            Ok(parsed) => {
                let mut items: Vec<(usize, Item)> = Vec::new();
                for p in parsed.policies() {
                    items.push((index_of(p.id()), Item::Static(p.clone())));
                }
                for t in parsed.templates() {
                    items.push((index_of(t.id()), Item::Template(t.clone())));
                }
                items.sort_by_key(|(i, _)| *i);
                for (i, item) in items {
                    let annotated = item.annotation_id().map(str::to_owned);
                    let id = PolicyId::new(
                        annotated
                            .clone()
                            .unwrap_or_else(|| format!("{}:{i}", src.rel)),
                    );
                    let offset = annotated
                        .as_deref()
                        .and_then(|a| src.text.find(&format!("\"{a}\"")))
                        .unwrap_or(0);
                    if let Some((first, _)) = origin.get(&id) {
                        let first = sources.get(*first).map_or(&src.rel, |s: &Source| &s.rel);
                        problems.push(src.problem(
                            Some(offset),
                            format!("duplicate policy id `{id}` (first defined in {first})"),
                        ));
                        continue;
                    }
                    let added = match item {
                        Item::Static(p) => {
                            counts.policies += 1;
                            policies.add(p.new_id(id.clone()))
                        }
                        Item::Template(t) => {
                            counts.templates += 1;
                            policies.add_template(t.new_id(id.clone()))
                        }
                    };
                    if let Err(e) = added {
                        problems.push(src.problem(Some(offset), cedar_message(&e)));
                    }
                    origin.insert(id, (idx, offset));
                }
            }
        }
        sources.push(src);
    }

    // Template links, in the Cedar CLI's format.
    if let Some(path) = &files.links {
        if let Some(src) = read(path, &mut problems) {
            match link_templates(&src, &mut policies) {
                Ok(n) => counts.links = n,
                Err(mut p) => problems.append(&mut p),
            }
        }
    }

    // Policy validation against the schema.
    if let Some(schema) = &schema {
        let mode = match validation {
            Validation::Permissive => ValidationMode::Permissive,
            _ => ValidationMode::Strict,
        };
        let result = Validator::new(schema.clone()).validate(&policies, mode);
        let locate = |id: &PolicyId, offset: Option<usize>, msg: String| -> Problem {
            match origin
                .get(id)
                .and_then(|(f, o)| sources.get(*f).map(|s| (s, o)))
            {
                Some((src, o)) => src.problem(offset.or(Some(*o)), msg),
                None => Problem {
                    file: files
                        .links
                        .as_ref()
                        .map_or_else(|| dir.display().to_string(), |l| relative(dir, l)),
                    line: 1,
                    col: 1,
                    message: format!("linked policy `{id}`: {msg}"),
                },
            }
        };
        for e in result.validation_errors() {
            for (offset, msg) in diagnostics(e) {
                problems.push(locate(e.policy_id(), offset, msg));
            }
        }
        for w in result.validation_warnings() {
            for (offset, msg) in diagnostics(w) {
                warnings.push(locate(w.policy_id(), offset, format!("warning: {msg}")));
            }
        }
    }

    // Entities, parsed against the schema as the Cedar CLI does.
    let entities = match &files.entities {
        None => match &schema {
            None => Ok(Entities::empty()),
            Some(s) => s
                .action_entities()
                .map_err(|e| vec![dir_problem(cedar_message(&e))]),
        },
        Some(path) => match read(path, &mut problems) {
            None => Ok(Entities::empty()),
            Some(src) => parse_entities(&src, schema.as_ref()),
        },
    };
    let entities = match entities {
        Ok(e) => e,
        Err(mut p) => {
            problems.append(&mut p);
            Entities::empty()
        }
    };
    counts.entities = entities.len();

    // Plugins (`plugins.toml`), checked against the schema. Their file and
    // the bytes of every `.wasm` are part of the hash: a cached decision
    // never outlives the plugin that helped make it.
    let plugins = match (&schema, dir.join(crate::plugin::SPECS_FILE).exists()) {
        (_, false) => Vec::new(),
        (None, true) => {
            problems.push(Problem {
                file: crate::plugin::SPECS_FILE.into(),
                line: 1,
                col: 1,
                message: "plugins need a schema that declares their context attributes".into(),
            });
            Vec::new()
        }
        (Some(schema), true) => {
            let view = SchemaView {
                schema,
                shapes: &shapes,
                namespace: namespace.as_deref(),
            };
            match crate::plugin::specs(dir, &view) {
                Ok(specs) => specs,
                Err(mut p) => {
                    problems.append(&mut p);
                    Vec::new()
                }
            }
        }
    };
    if let Ok(text) = std::fs::read(dir.join(crate::plugin::SPECS_FILE)) {
        hasher.update(b"plugins.toml");
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(&text);
        for p in &plugins {
            hasher.update(p.wasm_hash.as_bytes());
        }
    }
    counts.plugins = plugins.len();

    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    let slices = match &schema {
        Some(s) => slice(&policies, &entities, s),
        None => HashMap::new(),
    };
    let actions = match &schema {
        Some(s) => actions(s, &shapes),
        None => HashMap::new(),
    };
    Ok(Bundle {
        rules: crate::engine::Rules::new(policies.policies()),
        slices,
        actions,
        dir: dir.to_path_buf(),
        policies,
        schema,
        entities,
        hash: hex::encode(hasher.finalize()),
        namespace,
        validation,
        shapes,
        counts,
        warnings,
        plugins,
    })
}

/// An action of the schema, as the engine checks a request for it.
#[derive(Debug)]
pub struct Action {
    /// The uid as text (`Agency::Action::"read"`): the key of its context type.
    pub name: String,
    /// The principal and resource types it applies to, enumerated types left
    /// out (Cedar's validation checks their ids).
    pub principals: HashSet<EntityTypeName>,
    pub resources: HashSet<EntityTypeName>,
}

fn actions(schema: &Schema, shapes: &crate::shape::Shapes) -> HashMap<EntityUid, Action> {
    let types =
        |found: Option<Box<dyn Iterator<Item = &EntityTypeName> + '_>>| -> HashSet<EntityTypeName> {
            found
                .into_iter()
                .flatten()
                .filter(|t| !shapes.is_enum(&t.to_string()))
                .cloned()
                .collect()
        };
    schema
        .actions()
        .map(|a| {
            let action = Action {
                name: a.to_string(),
                principals: types(
                    schema
                        .principals_for_action(a)
                        .map(|i| Box::new(i) as Box<_>),
                ),
                resources: types(
                    schema
                        .resources_for_action(a)
                        .map(|i| Box::new(i) as Box<_>),
                ),
            };
            (a.clone(), action)
        })
        .collect()
}

/// The schema as the plugin loader sees it.
struct SchemaView<'a> {
    schema: &'a Schema,
    shapes: &'a crate::shape::Shapes,
    namespace: Option<&'a str>,
}

impl crate::plugin::SchemaView for SchemaView<'_> {
    fn actions(&self) -> Vec<(String, Vec<String>)> {
        self.schema
            .actions()
            .map(|a| {
                let resources = self
                    .schema
                    .resources_for_action(a)
                    .map(|r| r.map(|t| t.to_string()).collect())
                    .unwrap_or_default();
                (a.to_string(), resources)
            })
            .collect()
    }

    fn declares(&self, action: &str, attr: &str) -> bool {
        self.shapes.declares(action, attr)
    }

    fn qualify(&self, name: &str) -> String {
        match self.namespace {
            Some(ns) if !ns.is_empty() => format!("{ns}::{name}"),
            _ => name.to_owned(),
        }
    }
}

/// The policies that can apply to each action (see [`Bundle::slices`]).
fn slice(
    policies: &PolicySet,
    entities: &Entities,
    schema: &Schema,
) -> HashMap<EntityUid, crate::engine::Rules> {
    use cedar_policy::ActionConstraint;
    let applies = |constraint: ActionConstraint, action: &EntityUid| match constraint {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(a) => &a == action,
        ActionConstraint::In(groups) => groups
            .iter()
            .any(|g| g == action || entities.is_ancestor_of(g, action)),
    };
    schema
        .actions()
        .map(|action| {
            let applying = policies
                .policies()
                .filter(|p| applies(p.action_constraint(), action));
            (action.clone(), crate::engine::Rules::new(applying))
        })
        .collect()
}

enum Item {
    Static(cedar_policy::Policy),
    Template(cedar_policy::Template),
}

impl Item {
    fn annotation_id(&self) -> Option<&str> {
        match self {
            Item::Static(p) => p.annotation("id"),
            Item::Template(t) => t.annotation("id"),
        }
    }
}

/// Cedar names the n-th policy or template of a text `policy<n>`.
fn index_of(id: &PolicyId) -> usize {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

fn parse_schema(
    src: &Source,
    warnings: &mut Vec<Problem>,
) -> Result<(Schema, Option<String>, crate::shape::Shapes), Vec<Problem>> {
    let to_problems = |d: &dyn Diagnostic| {
        diagnostics(d)
            .into_iter()
            .map(|(o, m)| src.problem(o, m))
            .collect::<Vec<_>>()
    };
    let json_form: Option<serde_json::Value>;
    let schema = if src.rel.ends_with(".json") {
        json_form = serde_json::from_str(&src.text).ok();
        Schema::from_json_str(&src.text).map_err(|e| to_problems(&e))?
    } else {
        json_form = cedar_policy::SchemaFragment::from_cedarschema_str(&src.text)
            .ok()
            .and_then(|(f, _)| f.to_json_value().ok());
        let (schema, warns) =
            Schema::from_cedarschema_str(&src.text).map_err(|e| to_problems(&e))?;
        for w in warns {
            for (o, m) in diagnostics(&w) {
                warnings.push(src.problem(o, format!("warning: {m}")));
            }
        }
        schema
    };
    let namespaces: Vec<String> = schema
        .entity_types()
        .map(|t| t.namespace())
        .chain(schema.actions().map(|a| a.type_name().namespace()))
        .filter(|n| !n.is_empty())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let namespace = match namespaces.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    };
    let shapes = json_form
        .map(|j| crate::shape::Shapes::from_schema_json(&j))
        .unwrap_or_default();
    Ok((schema, namespace, shapes))
}

/// Byte offsets at which each element of a top-level JSON array starts.
/// `text` is known to be valid JSON (serde parsed it first).
fn array_element_offsets(text: &str) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut expecting = false;
    for (i, c) in text.char_indices() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        if expecting && !c.is_whitespace() && c != ']' {
            offsets.push(i);
            expecting = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 && c == '[' {
                    expecting = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    offsets
}

fn parse_json_array(src: &Source) -> Result<Vec<serde_json::Value>, Vec<Problem>> {
    let value: serde_json::Value = serde_json::from_str(&src.text).map_err(|e| {
        vec![Problem {
            file: src.rel.clone(),
            line: e.line(),
            col: e.column(),
            message: format!("invalid JSON: {e}"),
        }]
    })?;
    match value {
        serde_json::Value::Array(items) => Ok(items),
        _ => Err(vec![src.problem(None, "expected a JSON array")]),
    }
}

fn parse_entities(src: &Source, schema: Option<&Schema>) -> Result<Entities, Vec<Problem>> {
    let items = parse_json_array(src)?;
    let offsets = array_element_offsets(&src.text);
    let mut problems = Vec::new();
    let mut parsed = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = offsets.get(i).copied();
        match Entity::from_json_value(item, schema) {
            Ok(e) => parsed.push((e, at)),
            Err(e) => {
                problems.push(src.problem(at, format!("entity [{i}]: {}", cedar_message(&e))))
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let uids: BTreeMap<String, Option<usize>> = parsed
        .iter()
        .map(|(e, at)| (e.uid().to_string(), *at))
        .collect();
    Entities::from_entities(parsed.into_iter().map(|(e, _)| e), schema).map_err(|e| {
        let message = cedar_message(&e);
        // Point at the entity the message names, when it names one.
        let at = uids
            .iter()
            .find(|(uid, _)| message.contains(uid.as_str()))
            .and_then(|(_, at)| *at);
        vec![src.problem(at, message)]
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Link {
    template_id: String,
    link_id: String,
    args: BTreeMap<String, serde_json::Value>,
}

fn link_templates(src: &Source, policies: &mut PolicySet) -> Result<usize, Vec<Problem>> {
    let items = parse_json_array(src)?;
    let offsets = array_element_offsets(&src.text);
    let mut problems = Vec::new();
    let mut n = 0;
    for (i, item) in items.into_iter().enumerate() {
        let at = offsets.get(i).copied();
        let link: Link = match serde_json::from_value(item) {
            Ok(l) => l,
            Err(e) => {
                problems.push(src.problem(at, format!("link [{i}]: {e}")));
                continue;
            }
        };
        let mut values = HashMap::new();
        for (slot, value) in &link.args {
            let slot_id = match slot.as_str() {
                "?principal" | "principal" => SlotId::principal(),
                "?resource" | "resource" => SlotId::resource(),
                other => {
                    problems.push(src.problem(
                        at,
                        format!("link [{i}]: unknown slot `{other}` (expected `?principal` or `?resource`)"),
                    ));
                    continue;
                }
            };
            match crate::engine::parse_uid(value) {
                Ok(uid) => {
                    values.insert(slot_id, uid);
                }
                Err(e) => problems.push(src.problem(at, format!("link [{i}] `{slot}`: {e}"))),
            }
        }
        match policies.link(
            PolicyId::new(&link.template_id),
            PolicyId::new(&link.link_id),
            values,
        ) {
            Ok(()) => n += 1,
            Err(e) => problems.push(src.problem(at, format!("link [{i}]: {}", cedar_message(&e)))),
        }
    }
    if problems.is_empty() {
        Ok(n)
    } else {
        Err(problems)
    }
}

/// Parses an entity uid written as a Cedar string (`NS::User::"alice"`).
pub fn uid_from_str(s: &str) -> Result<EntityUid, String> {
    EntityUid::from_str(s).map_err(|e| format!("invalid entity uid `{s}`: {}", cedar_message(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        let text = "ab\ncdé\nf";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 8), (3, 1));
        assert_eq!(line_col(text, 7), (2, 4), "é is one column");
    }

    #[test]
    fn array_offsets_skip_strings_and_nesting() {
        let text = r#"[ {"a":"],{"}, [1,2] ,3]"#;
        let offs = array_element_offsets(text);
        assert_eq!(offs.len(), 3);
        assert_eq!(&text[offs[0]..offs[0] + 1], "{");
        assert_eq!(&text[offs[1]..offs[1] + 1], "[");
        assert_eq!(&text[offs[2]..offs[2] + 1], "3");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    fn example() -> Bundle {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        load(&dir, Validation::Strict).unwrap()
    }

    #[test]
    fn the_example_loads_with_its_ids() {
        let b = example();
        assert_eq!(b.namespace.as_deref(), Some("Agency"));
        assert!(b
            .policies
            .policy(&PolicyId::new("forbid-suspended"))
            .is_some());
        assert!(b
            .policies
            .policy(&PolicyId::new("delegation-mathis-social"))
            .is_some());
        assert!(b
            .policies
            .template(&PolicyId::new("delegated-read"))
            .is_some());
    }

    #[test]
    fn slices_keep_only_the_policies_an_action_can_match() {
        let b = example();
        let read: EntityUid = r#"Agency::Action::"read""#.parse().unwrap();
        let slice = &b.slices[&read];
        let ids: Vec<String> = slice.ids().map(str::to_owned).collect();
        assert!(ids.contains(&"staff-read-department".to_owned()));
        assert!(
            ids.contains(&"forbid-suspended".to_owned()),
            "action-unconstrained policies apply"
        );
        assert!(
            ids.contains(&"forbid-sensitive-outside-eu".to_owned()),
            "`in` an action group applies"
        );
        assert!(
            ids.contains(&"delegation-mathis-social".to_owned()),
            "template links are kept"
        );
        assert!(!ids.contains(&"admin-administer-hardware-mfa".to_owned()));
        assert!(!ids.contains(&"staff-update-department".to_owned()));
        assert!(ids.len() < b.policies.policies().count());
    }

    #[test]
    fn context_errors_are_located_in_the_example_schema() {
        let b = example();
        let found = b.shapes.locate(
            "Agency::Action::\"read\"",
            &serde_json::json!({"mfa": {"present": "yes", "methods": [], "age_seconds": 1, "hardware": false}}),
        );
        assert_eq!(found.map(|f| f.0).as_deref(), Some("context.mfa.present"));
    }
}
