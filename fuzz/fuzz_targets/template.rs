//! Key templates: parse any text; render what parses against any attribute values.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use llm_token_ratelimit::template::{Attribute, AttributeSource, Template};

struct Echo<'a>(&'a str);

impl AttributeSource for Echo<'_> {
    fn attribute(&self, _attr: &Attribute) -> Option<Cow<'_, str>> {
        (!self.0.is_empty()).then_some(Cow::Borrowed(self.0))
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (template, value) = text.split_once('\u{1}').unwrap_or((&text, "v"));
    if let Ok(t) = Template::parse(template) {
        let _ = t.render(&Echo(value));
    }
});
