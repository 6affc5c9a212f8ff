//! The JSON Schema of the plugin configuration (`deploy/schema/plugin-config.schema.json`),
//! generated from the very types the plugin reads, so the two cannot drift apart. Built only
//! with the `schema` feature (`cargo run -p schema-gen`), never into the `.wasm`.
//!
//! The types give every field, its type and its bounds. What spans several fields (`cluster`
//! or `host`; `domain` only with `envoy-rls`; one `limit_by_*` per rule item) is added here,
//! as far as JSON Schema can say it; the plugin checks all of it at load and names the field.

use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

use super::options::Options;
use super::shape::asm::Asm;
use super::shape::higress::{Rule, ScopeSpec, RULES};
use super::shape::native::Native;

/// The schema of all three shapes, as committed in `deploy/schema/`.
pub fn generate() -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    // Each lands in the definitions, which are then composed into the three shapes.
    generator.subschema_for::<Native>();
    generator.subschema_for::<Asm>();
    generator.subschema_for::<Rule>();
    generator.subschema_for::<ScopeSpec>();
    generator.subschema_for::<Options>();
    let mut defs = generator.take_definitions(true);
    let options = properties(&defs, "Options");

    // Each shape's object holds its own fields and the shared options.
    with_options(&mut defs, "Native", &options);
    with_options(&mut defs, "Asm", &options);
    let rule = properties(&defs, "Rule");
    let scope = properties(&defs, "ScopeSpec");
    defs.remove("Rule");
    defs.remove("ScopeSpec");
    defs.remove("Options");

    let mut native = take(&mut defs, "Native");
    native["title"] = json!("native shape");
    required(&mut native, &["service", "limits"]);
    native["properties"]["limits"]["minItems"] = json!(1);
    native["properties"]["matches"]["items"] = native_matches();
    defs.insert("native".into(), native);

    let mut asm = take(&mut defs, "Asm");
    asm["title"] = json!("ASM shape (rateLimitKeys, rateLimitService)");
    required(&mut asm, &["rateLimitKeys", "rateLimitService"]);
    asm["properties"]["rateLimitKeys"]["minItems"] = json!(1);
    asm["properties"]["matches"]["items"] = native_matches();
    defs.insert("asm".into(), asm);

    // Higress: the top object is a rule (the default for requests no scoped rule claims) and
    // holds `_rules_`, each a rule with a scope.
    let mut rule_and_options = rule.clone();
    rule_and_options.extend(options);
    let mut entry = rule_and_options.clone();
    entry.extend(scope);
    let mut top = rule_and_options;
    top.insert(
        RULES.into(),
        json!({
            "description": "Rules scoped to routes, domains or services (Higress matchRules).",
            "type": "array",
            "items": {
                "type": "object",
                "properties": entry,
                "anyOf": [
                    {"required": ["_match_route_"]},
                    {"required": ["_match_domain_"]},
                    {"required": ["_match_service_"]}
                ]
            }
        }),
    );
    defs.insert(
        "higress".into(),
        json!({
            "title": "Higress shape (ai-token-ratelimit)",
            "type": "object",
            "properties": top,
            "anyOf": [
                {"required": ["rule_name", "service"]},
                {"required": [RULES]}
            ]
        }),
    );

    cross_field_rules(&mut defs);

    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://llm-token-ratelimit.dev/schema/plugin-config.schema.json",
        "title": "llm-token-ratelimit plugin configuration",
        "description": "The plugin's configuration in any of its three shapes: native, ASM (rateLimitKeys) or Higress (rule_name / _rules_). Generated from the plugin's configuration types; the plugin checks the same rules at load and names the field of any error.",
        "oneOf": [
            {"$ref": "#/$defs/native"},
            {"$ref": "#/$defs/asm"},
            {"$ref": "#/$defs/higress"}
        ],
        "$defs": defs,
    })
}

/// `matches` entries are decided on the headers, before the body is read: no `model`.
fn native_matches() -> Value {
    json!({"$ref": "#/$defs/MatchSpec", "not": {"required": ["model"]}})
}

/// Fields the types keep optional only to refuse their absence with a hint of what to write.
fn required(def: &mut Value, names: &[&str]) {
    def["required"] = json!(names);
    for name in names {
        let prop = &mut def["properties"][*name];
        if let Some(Value::Array(any)) = prop.get_mut("anyOf") {
            any.retain(|s| s != &json!({"type": "null"}));
        }
        if let Some(Value::Array(types)) = prop.get_mut("type") {
            types.retain(|t| t != "null");
        }
    }
}

fn take(defs: &mut Map<String, Value>, name: &str) -> Value {
    defs.remove(name).unwrap_or_else(|| json!({}))
}

fn properties(defs: &Map<String, Value>, name: &str) -> Map<String, Value> {
    defs.get(name)
        .and_then(|d| d.get("properties"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn with_options(defs: &mut Map<String, Value>, name: &str, options: &Map<String, Value>) {
    if let Some(Value::Object(props)) = defs.get_mut(name).and_then(|d| d.get_mut("properties")) {
        for (k, v) in options {
            props.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}

/// The rules that span fields, on the definitions they belong to.
fn cross_field_rules(defs: &mut Map<String, Value>) {
    let mut add = |name: &str, rules: Value| {
        if let Some(def) = defs.get_mut(name).and_then(Value::as_object_mut) {
            def.insert("allOf".into(), rules);
        }
    };
    add(
        "ServiceSpec",
        json!([
            {"oneOf": [{"required": ["cluster"]}, {"required": ["host"]}]},
            {"if": {"required": ["cluster"]}, "then": {"not": {"required": ["port"]}}},
            {
                "if": {"required": ["protocol"], "properties": {"protocol": {"const": "envoy-rls"}}},
                "then": {"required": ["domain"]},
                "else": {"not": {"anyOf": [{"required": ["domain"]}, {"required": ["descriptor_entries"]}]}}
            }
        ]),
    );
    let sources = [
        "limit_by_header",
        "limit_by_param",
        "limit_by_cookie",
        "limit_by_consumer",
        "limit_by_per_header",
        "limit_by_per_param",
        "limit_by_per_cookie",
        "limit_by_per_consumer",
        "limit_by_per_ip",
    ];
    let one_source: Vec<Value> = sources.iter().map(|s| json!({"required": [s]})).collect();
    add(
        "RuleItem",
        json!([
            {"oneOf": one_source},
            {"required": ["limit_keys"]},
            {"properties": {
                "limit_by_per_ip": {"pattern": "^(from-remote-addr|from-header-[A-Za-z0-9!#$%&'*+.^_`|~-]+)$"},
                "limit_keys": {"minItems": 1}
            }}
        ]),
    );
    add(
        "Thresholds",
        json!([{"anyOf": [
            {"required": ["token_per_second"]},
            {"required": ["token_per_minute"]},
            {"required": ["token_per_hour"]},
            {"required": ["token_per_day"]}
        ]}]),
    );
    add(
        "LimitSpec",
        json!([
            {"not": {"required": ["rates", "tokens"]}},
            {"not": {"required": ["rates", "window"]}},
            {"dependentRequired": {"tokens": ["window"], "budget": ["window"]}},
            {"if": {"required": ["window"]}, "then": {"anyOf": [{"required": ["tokens"]}, {"required": ["budget"]}]}},
            {"not": {"required": ["tokens", "budget"]}},
            {
                "if": {"required": ["unit"], "properties": {"unit": {"const": "cost"}}},
                "then": {"not": {"required": ["tokens"]}},
                "else": {"not": {"required": ["budget"]}}
            },
            {"properties": {"rates": {"minItems": 1}, "values": {"minItems": 1}}}
        ]),
    );
    add(
        "ValueRuleSpec",
        json!([
            {"anyOf": [{"required": ["tokens", "window"]}, {"required": ["budget", "window"]}, {"required": ["rates"]}]},
            {"not": {"required": ["rates", "tokens"]}},
            {"not": {"required": ["rates", "budget"]}}
        ]),
    );
    add(
        "RateSpec",
        json!([{"oneOf": [{"required": ["tokens"]}, {"required": ["budget"]}]}]),
    );
}
