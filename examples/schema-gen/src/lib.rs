//! The committed form of the generated schema: pretty JSON with a final newline.

/// The schema as `deploy/schema/plugin-config.schema.json` holds it.
pub fn text() -> String {
    let schema = llm_token_ratelimit::config::schema::generate();
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    /// `make test` fails when the committed schema is not what the types give.
    #[test]
    fn the_committed_schema_is_the_generated_one() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/schema/plugin-config.schema.json"
        );
        let committed = std::fs::read_to_string(path).unwrap();
        assert!(
            committed == super::text(),
            "{path} is not the schema the configuration types give; run `make schema` and commit it"
        );
    }
}
