//! The request bodies the OpenAPI document describes, checked against what the API accepts:
//! each body is handed to the same reading the handler does (`enqueue::parse_one`,
//! `enqueue::parse_batch`, `BulkRequest::parse`), so the document cannot drift from it.
//!
//! For each documented object: the property names are the reader's own (taken from its
//! refusal of an unknown field, which lists the fields it knows); the smallest body the
//! document allows is accepted; a value of each documented type (each `oneOf` alternative)
//! is accepted and one of another type refused; a property the document requires is
//! refused when missing. Whether the body itself is `required` is checked with an empty one.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::api::enqueue;
use crate::api::handlers::BulkRequest;
use crate::config::Config;

/// How the API reads a body: `Err` holds the message it answers with.
type Reader<'r> = &'r dyn Fn(&[u8]) -> Result<(), String>;

/// A name no reader knows.
const UNKNOWN: &str = "taskd_undocumented_field";

struct RequestCheck<'a> {
    doc: &'a Value,
    errors: Vec<String>,
}

impl<'a> RequestCheck<'a> {
    fn new(doc: &'a Value) -> Self {
        RequestCheck {
            doc,
            errors: Vec::new(),
        }
    }

    fn resolve<'s>(&self, schema: &'s Value) -> &'s Value
    where
        'a: 's,
    {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let name = reference
                    .strip_prefix("#/components/schemas/")
                    .expect("the document refers only to its own schemas");
                let target = &self.doc["components"]["schemas"][name];
                assert!(!target.is_null(), "dangling $ref {reference}");
                self.resolve(target)
            }
            None => schema,
        }
    }

    /// The values the schema allows, one per `oneOf` alternative: its `example`, its
    /// `default`, its first `enum` value, or one made from its type and format.
    fn samples(&self, schema: &Value) -> Vec<Value> {
        let schema = self.resolve(schema);
        if let Some(alternatives) = schema.get("oneOf").and_then(Value::as_array) {
            return alternatives.iter().flat_map(|a| self.samples(a)).collect();
        }
        for key in ["example", "default"] {
            if let Some(value) = schema.get(key) {
                return vec![value.clone()];
            }
        }
        if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
            return vec![first.clone()];
        }
        let value = match schema.get("type").and_then(Value::as_str) {
            Some("string") => match schema.get("format").and_then(Value::as_str) {
                Some("uuid") => json!(crate::model::TaskId::new().to_string()),
                Some("date-time") => json!("2030-01-01T00:00:00Z"),
                _ => json!("x"),
            },
            Some("integer") | Some("number") => json!(1),
            Some("boolean") => json!(true),
            Some("array") => json!(self.samples(&schema["items"])),
            Some("object") => Value::Object(self.smallest(schema)),
            // Any JSON value (a payload).
            _ => json!({}),
        };
        vec![value]
    }

    /// The object with the required properties only, each with a sample value.
    fn smallest(&self, schema: &Value) -> serde_json::Map<String, Value> {
        required(schema)
            .into_iter()
            .map(|name| {
                let value = self.samples(&schema["properties"][&name]).remove(0);
                (name, value)
            })
            .collect()
    }

    /// A value of none of the types `schema` allows (`None`: it allows any).
    fn mistyped(&self, schema: &Value) -> Option<Value> {
        let schema = self.resolve(schema);
        let types: BTreeSet<&str> = match schema.get("oneOf").and_then(Value::as_array) {
            Some(alternatives) => alternatives
                .iter()
                .filter_map(|a| self.resolve(a).get("type").and_then(Value::as_str))
                .collect(),
            None => schema
                .get("type")
                .and_then(Value::as_str)
                .into_iter()
                .collect(),
        };
        if types.is_empty() {
            return None;
        }
        [json!(true), json!("x"), json!(7)]
            .into_iter()
            .find(|v| !types.iter().any(|t| fits(t, v)))
    }

    /// Checks the object `schema` at `at`: `wrap` puts an object of it into a whole body,
    /// which `read` reads.
    fn object(&mut self, at: &str, schema: &Value, wrap: &dyn Fn(Value) -> Value, read: Reader) {
        let schema = self.resolve(schema);
        let base = self.smallest(schema);
        let with = |extra: &[(&str, Value)]| {
            let mut body = base.clone();
            for (k, v) in extra {
                body.insert(k.to_string(), v.clone());
            }
            wrap(Value::Object(body))
        };
        let answer = |body: &Value| read(&serde_json::to_vec(body).expect("a body serializes"));
        let smallest = with(&[]);
        if let Err(why) = answer(&smallest) {
            self.errors.push(format!(
                "{at}: the API refuses the smallest body the document allows, {smallest}: {why}"
            ));
        }
        let empty = serde_json::Map::new();
        let properties = schema["properties"].as_object().unwrap_or(&empty);
        self.names(
            at,
            schema,
            properties,
            answer(&with(&[(UNKNOWN, json!(1))])),
        );
        for (name, property) in properties {
            let here = format!("{at}.{name}");
            for value in self.samples(property) {
                let body = with(&[(name, value.clone())]);
                if let Err(why) = answer(&body) {
                    self.errors.push(format!(
                        "{here}: the document allows {value}, but the API refuses it: {why}"
                    ));
                }
            }
            if let Some(value) = self.mistyped(property) {
                if answer(&with(&[(name, value.clone())])).is_ok() {
                    self.errors.push(format!(
                        "{here}: the document says {}, but the API takes {value}",
                        describe(self.resolve(property))
                    ));
                }
            }
            let resolved = self.resolve(property);
            if resolved.get("enum").is_some() {
                let outside = json!("taskd-not-in-the-enum");
                if answer(&with(&[(name, outside.clone())])).is_ok() {
                    self.errors.push(format!(
                        "{here}: the document lists {}, but the API takes {outside}",
                        resolved["enum"]
                    ));
                }
            }
            if resolved["type"] == "object" && resolved.get("properties").is_some() {
                let outer = base.clone();
                let key = name.clone();
                let inner_wrap = move |inner: Value| {
                    let mut body = outer.clone();
                    body.insert(key.clone(), inner);
                    wrap(Value::Object(body))
                };
                self.object(&here, resolved, &inner_wrap, read);
            }
        }
        for name in required(schema) {
            let mut body = base.clone();
            body.remove(&name);
            if answer(&wrap(Value::Object(body))).is_ok() {
                self.errors.push(format!(
                    "{at}.{name}: required by the document, but the API takes a body without it"
                ));
            }
        }
    }

    /// The reader's field names (its answer to an unknown one lists those it knows) against
    /// the document's properties, both ways.
    fn names(
        &mut self,
        at: &str,
        schema: &Value,
        properties: &serde_json::Map<String, Value>,
        unknown: Result<(), String>,
    ) {
        let closed = schema["additionalProperties"] == false;
        let why = match (unknown, closed) {
            (Ok(()), true) => {
                self.errors.push(format!(
                    "{at}: the document allows no other property, but the API takes `{UNKNOWN}`"
                ));
                return;
            }
            (Ok(()), false) => return,
            (Err(why), false) => {
                self.errors.push(format!(
                    "{at}: the API refuses a property it does not know, but the document does not say `additionalProperties: false`"
                ));
                why
            }
            (Err(why), true) => why,
        };
        let Some(known) = known_fields(&why) else {
            self.errors.push(format!(
                "{at}: the API's refusal of an unknown field does not list the fields it knows: {why}"
            ));
            return;
        };
        let documented: BTreeSet<String> = properties.keys().cloned().collect();
        for name in known.difference(&documented) {
            self.errors.push(format!(
                "{at}.{name}: the API accepts it, but the document does not describe it"
            ));
        }
        for name in documented.difference(&known) {
            self.errors.push(format!(
                "{at}.{name}: documented, but the API does not know it"
            ));
        }
    }
}

fn required(schema: &Value) -> Vec<String> {
    schema["required"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn fits(kind: &str, value: &Value) -> bool {
    match kind {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

fn describe(schema: &Value) -> String {
    match schema.get("oneOf").and_then(Value::as_array) {
        Some(alternatives) => alternatives
            .iter()
            .map(|a| a["type"].as_str().unwrap_or("any").to_string())
            .collect::<Vec<_>>()
            .join(" or "),
        None => schema["type"].as_str().unwrap_or("any").to_string(),
    }
}

/// The fields serde lists when it refuses an unknown one: "unknown field `x`, expected one
/// of `a`, `b`" (or "expected `a` or `b`", or "expected `a`").
fn known_fields(message: &str) -> Option<BTreeSet<String>> {
    let (_, expected) = message.split_once("expected")?;
    let names: BTreeSet<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    (!names.is_empty()).then_some(names)
}

fn config() -> Config {
    crate::config::parse_str(
        "[queues.q]\nshell = \"true\"\n",
        std::path::Path::new("/tmp/taskd-openapi-test.toml"),
    )
    .expect("a valid config")
}

fn text(body: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(body).map_err(|e| e.to_string())
}

/// Every documented request body is checked, with the reader of its handler.
#[test]
fn request_schemas_match_what_the_api_reads() {
    let doc = super::document();
    let config = config();
    let queue = config.queues.values().next().expect("a queue");
    let one = |body: &[u8]| {
        enqueue::parse_one(&config, queue, body)
            .map(drop)
            .map_err(|e| e.message)
    };
    let batch = |body: &[u8]| {
        enqueue::parse_batch(&config, queue, body)
            .map(drop)
            .map_err(|e| e.message)
    };
    // The same tasks as JSON lines: the array a check builds, one item per line.
    let lines = |body: &[u8]| {
        let array: Value = serde_json::from_str(text(body)?).map_err(|e| e.to_string())?;
        let lines: Vec<String> = array
            .as_array()
            .map(|items| items.iter().map(Value::to_string).collect())
            .unwrap_or_default();
        batch(lines.join("\n").as_bytes())
    };
    let bulk = |body: &[u8]| BulkRequest::parse(body).map(drop).map_err(|e| e.message);
    let readers: [(&str, &str, &str, Reader); 4] = [
        (
            "post",
            "/api/v1/queues/{queue}/tasks",
            "application/json",
            &one,
        ),
        (
            "post",
            "/api/v1/queues/{queue}/tasks/batch",
            "application/json",
            &batch,
        ),
        (
            "post",
            "/api/v1/queues/{queue}/tasks/batch",
            "application/x-ndjson",
            &lines,
        ),
        ("post", "/api/v1/tasks/bulk", "application/json", &bulk),
    ];
    let mut check = RequestCheck::new(&doc);
    let mut seen = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("operations") {
            let Some(body) = op.get("requestBody") else {
                continue;
            };
            let required = body["required"] == true;
            for (media, content) in body["content"].as_object().expect("content") {
                let at = format!("{} {path} ({media})", method.to_uppercase());
                // A raw payload: the body is the bytes, whatever they are.
                if content["schema"]["format"] == "binary" {
                    let raw = enqueue::parse_raw(&config, queue, b"\x00\xff\n", None);
                    if path != "/api/v1/queues/{queue}/tasks" || !enqueue::is_raw(Some(media)) {
                        check
                            .errors
                            .push(format!("{at}: a binary body the API does not read"));
                    } else if let Err(e) = raw {
                        check.errors.push(format!("{at}: refused: {}", e.message));
                    }
                    continue;
                }
                let Some((_, _, _, read)) = readers.iter().find(|(m, p, t, _)| {
                    (*m, *p, *t) == (method.as_str(), path.as_str(), media.as_str())
                }) else {
                    check.errors.push(format!(
                        "{at}: a documented request body no reader is checked for"
                    ));
                    continue;
                };
                seen.insert((method.clone(), path.clone(), media.clone()));
                match (read(b""), required) {
                    (Ok(()), true) => check.errors.push(format!(
                        "{at}: the body is `required`, but the API takes an empty one"
                    )),
                    (Err(why), false) => check.errors.push(format!(
                        "{at}: the body is not `required`, but the API refuses an empty one: {why}"
                    )),
                    _ => {}
                }
                // A JSON lines body is documented as text; its lines are the JSON body's items.
                let schema = if media == "application/x-ndjson" {
                    &ops["post"]["requestBody"]["content"]["application/json"]["schema"]
                } else {
                    &content["schema"]
                };
                let schema = check.resolve(schema).clone();
                if schema["type"] == "array" {
                    let wrap = |item: Value| json!([item]);
                    check.object(&format!("{at}[]"), &schema["items"], &wrap, *read);
                } else {
                    check.object(&at, &schema, &|body| body, *read);
                }
            }
        }
    }
    for (method, path, media, _) in readers {
        if !seen.contains(&(method.to_string(), path.to_string(), media.to_string())) {
            check.errors.push(format!(
                "{} {path} ({media}): read by the API, but the document has no such request body",
                method.to_uppercase()
            ));
        }
    }
    assert!(
        check.errors.is_empty(),
        "the OpenAPI document and what the API reads differ:\n{}",
        check.errors.join("\n")
    );
}

/// The check itself finds each kind of disagreement (so a pass above means something),
/// against a reader of the same kind as the API's: serde, unknown fields refused.
#[test]
fn the_request_check_finds_each_kind_of_disagreement() {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: Option<u32>,
        secret: Option<bool>,
    }
    let read = |body: &[u8]| {
        serde_json::from_slice::<Body>(body)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let errors = |schema: Value| {
        let doc = json!({ "components": { "schemas": { "S": schema } } });
        let mut check = RequestCheck::new(&doc);
        check.object(
            "x",
            &json!({ "$ref": "#/components/schemas/S" }),
            &|b| b,
            &read,
        );
        check.errors
    };
    let good = json!({ "type": "object", "additionalProperties": false, "required": ["name"], "properties": {
        "name": { "type": "string" }, "count": { "type": "integer" }, "secret": { "type": "boolean" } } });
    assert_eq!(errors(good.clone()), Vec::<String>::new());
    let mut cases: Vec<(Value, &str)> = Vec::new();
    let mut missing = good.clone();
    missing["properties"]
        .as_object_mut()
        .unwrap()
        .remove("secret");
    cases.push((
        missing,
        "x.secret: the API accepts it, but the document does not describe it",
    ));
    let mut extra = good.clone();
    extra["properties"]["color"] = json!({ "type": "string" });
    cases.push((extra, "x.color: documented, but the API does not know it"));
    let mut retyped = good.clone();
    retyped["properties"]["count"] = json!({ "type": "string" });
    cases.push((
        retyped,
        "x.count: the document allows \"x\", but the API refuses it",
    ));
    let mut untyped = good.clone();
    untyped["properties"]["count"] =
        json!({ "oneOf": [{ "type": "integer" }, { "type": "boolean" }] });
    cases.push((
        untyped,
        "x.count: the document allows true, but the API refuses it",
    ));
    let mut optional = good.clone();
    optional["required"] = json!([]);
    cases.push((
        optional,
        "x: the API refuses the smallest body the document allows",
    ));
    let mut more_required = good.clone();
    more_required["required"] = json!(["name", "count"]);
    cases.push((
        more_required,
        "x.count: required by the document, but the API takes a body without it",
    ));
    let mut listed = good.clone();
    listed["properties"]["name"] = json!({ "type": "string", "enum": ["a", "b"] });
    cases.push((
        listed,
        "x.name: the document lists [\"a\",\"b\"], but the API takes \"taskd-not-in-the-enum\"",
    ));
    let mut open = good.clone();
    open.as_object_mut().unwrap().remove("additionalProperties");
    cases.push((open, "x: the API refuses a property it does not know, but the document does not say `additionalProperties: false`"));
    for (schema, want) in cases {
        let got = errors(schema.clone());
        assert!(
            got.iter().any(|e| e.starts_with(want)),
            "{schema}: want {want:?}, got {got:#?}"
        );
    }
    // A mistyped value the reader takes: a document saying string where it takes anything.
    let loose = |body: &[u8]| {
        serde_json::from_slice::<Value>(body)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let doc = json!({});
    let mut check = RequestCheck::new(&doc);
    check.object(
        "y",
        &json!({ "type": "object", "properties": { "name": { "type": "string" } } }),
        &|b| b,
        &loose,
    );
    assert!(
        check
            .errors
            .iter()
            .any(|e| e == "y.name: the document says string, but the API takes true"),
        "{:#?}",
        check.errors
    );
}
