//! `schema-gen`: prints the plugin configuration's JSON Schema, generated from the types the
//! plugin reads its configuration into; `schema-gen --check <file>` fails when the committed
//! file differs (part of `make test`). `make schema` rewrites the committed file.

use std::process::ExitCode;

fn main() -> ExitCode {
    let generated = schema_gen::text();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {
            print!("{generated}");
            ExitCode::SUCCESS
        }
        [flag, path] if flag == "--check" => match std::fs::read_to_string(path) {
            Ok(committed) if committed == generated => ExitCode::SUCCESS,
            Ok(_) => {
                eprintln!("{path} is not the schema the configuration types give; run `make schema` and commit it");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("{path}: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: schema-gen [--check <schema file>]");
            ExitCode::from(2)
        }
    }
}
