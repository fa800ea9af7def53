//! `--name value` arguments, without a dependency.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

pub struct Args {
    values: HashMap<String, String>,
    pub rest: Vec<String>,
}

impl Args {
    /// Parses `--name value` pairs up to `--`; what follows `--` is kept in `rest`.
    pub fn parse(args: impl Iterator<Item = String>) -> Args {
        let mut values = HashMap::new();
        let mut rest = Vec::new();
        let mut it = args.peekable();
        while let Some(a) = it.next() {
            if a == "-h" {
                values.insert("help".to_owned(), "true".to_owned());
                continue;
            }
            if a == "--" {
                rest.extend(it.by_ref());
                break;
            }
            match a.strip_prefix("--") {
                Some(name) => {
                    let value = match it.peek() {
                        Some(v) if !v.starts_with("--") => it.next().unwrap_or_default(),
                        _ => "true".to_owned(),
                    };
                    values.insert(name.to_owned(), value);
                }
                None => die(&format!("unexpected argument {a:?}")),
            }
        }
        Args { values, rest }
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn required(&self, name: &str) -> &str {
        self.str(name)
            .unwrap_or_else(|| die(&format!("--{name} is required")))
    }

    pub fn get<T: FromStr>(&self, name: &str, default: T) -> T {
        match self.str(name) {
            None => default,
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| die(&format!("--{name}: cannot parse {v:?}"))),
        }
    }

    /// Seconds, fractions allowed.
    pub fn secs(&self, name: &str, default: f64) -> Duration {
        Duration::from_secs_f64(self.get(name, default))
    }

    /// A comma-separated list of process ids (empty when absent).
    pub fn pids(&self, name: &str) -> Vec<u32> {
        self.str(name)
            .map(|v| {
                v.split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        p.parse()
                            .unwrap_or_else(|_| die(&format!("--{name}: bad pid {p:?}")))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub fn die(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}
