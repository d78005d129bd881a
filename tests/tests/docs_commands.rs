//! The doc check: every `trustline-ca`, `trustline-agent`, `trustline-sidecar` and `trustline-audit` command in
//! README.md and docs/*.md (fenced `sh`, `bash`, `shell` and `console` blocks) and in the deploy files (systemd
//! `ExecStart=`, Kubernetes container commands) must be one the binary's argument parser accepts:
//!
//! - its subcommand path answers `<bin> <subcommands...> --help` with exit 0, and names a leaf command (one that
//!   needs no further subcommand);
//! - every flag it uses is in that `--help` (or the help of the level it was given at, for global flags placed
//!   before the subcommand), a flag's value is one of its `[possible values: ...]` when the help lists them, and
//!   required flags and positional arguments are there.
//!
//! The deploy files are also checked for shape: systemd units parse as INI with `[Unit]`, `[Service]` and
//! `[Install]` and the hardening the operator guide promises; Kubernetes manifests parse as YAML with the expected
//! kinds, the sidecar ConfigMap's `sidecar.toml` passes the sidecar's own config parser and its policies the
//! policy parser, and the agent ConfigMap's `agent.toml` the agent's config parser.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use trustline_tests::bin;

const BINS: [&str; 4] = [
    "trustline-ca",
    "trustline-agent",
    "trustline-sidecar",
    "trustline-audit",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

// ---------------------------------------------------------------------------------------------------------------
// What a binary's `--help` says.

#[derive(Debug, Default)]
struct Opt {
    takes_value: bool,
    possible: Vec<String>,
}

#[derive(Debug, Default)]
struct Help {
    subcommands: Vec<String>,
    /// `--long`, `-s` and aliases.
    options: HashMap<String, Opt>,
    /// Flags the usage line names outside `[...]`.
    required_flags: Vec<String>,
    required_positionals: usize,
    /// `None`: any number.
    max_positionals: Option<usize>,
}

fn parse_help(text: &str) -> Help {
    let mut h = Help::default();
    let mut section = "";
    let mut current: Option<Vec<String>> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(usage) = line.strip_prefix("Usage: ") {
            parse_usage(usage, &mut h);
            continue;
        }
        if !line.starts_with(' ') && trimmed.ends_with(':') {
            section = match trimmed {
                "Commands:" => "commands",
                "Options:" => "options",
                "Arguments:" => "arguments",
                _ => "",
            };
            current = None;
            continue;
        }
        match section {
            // "  name  Description" (two-space indent).
            "commands" if line.starts_with("  ") && !line.starts_with("   ") => {
                if let Some(name) = trimmed.split_whitespace().next().filter(|n| *n != "help") {
                    h.subcommands.push(name.to_owned());
                }
            }
            "options" => {
                if trimmed.starts_with('-') && line.starts_with("  ") && !line.starts_with("       ") {
                    // "  -c, --config <CONFIG>" or "      --exit"
                    let mut names = Vec::new();
                    let mut takes_value = false;
                    for part in trimmed.split(", ") {
                        let mut words = part.split_whitespace();
                        if let Some(n) = words.next() {
                            names.push(n.to_owned());
                        }
                        if words.next().is_some_and(|v| v.starts_with('<')) {
                            takes_value = true;
                        }
                    }
                    for n in &names {
                        h.options.insert(
                            n.clone(),
                            Opt {
                                takes_value,
                                possible: Vec::new(),
                            },
                        );
                    }
                    current = Some(names);
                } else if let Some(names) = &current {
                    for (key, aliases) in [
                        ("[alias: ", true),
                        ("[aliases: ", true),
                        ("[possible values: ", false),
                    ] {
                        if let Some(rest) = trimmed.strip_prefix(key) {
                            let list: Vec<String> = rest
                                .trim_end_matches(']')
                                .split(", ")
                                .map(|s| s.trim().to_owned())
                                .collect();
                            let takes_value = h.options.get(&names[0]).is_some_and(|o| o.takes_value);
                            if aliases {
                                for a in list {
                                    h.options.insert(
                                        a,
                                        Opt {
                                            takes_value,
                                            possible: Vec::new(),
                                        },
                                    );
                                }
                            } else {
                                for n in names {
                                    if let Some(o) = h.options.get_mut(n) {
                                        o.possible = list.clone();
                                    }
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    h
}

/// `trustline-audit trace [OPTIONS] <TRACE_ID> [DIRS]...`: required flags and positionals.
fn parse_usage(usage: &str, h: &mut Help) {
    let words: Vec<&str> = usage.split_whitespace().collect();
    let mut max = Some(0usize);
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        if w.starts_with("--") || (w.starts_with('-') && w.len() == 2) {
            h.required_flags.push(w.to_owned());
            if words.get(i + 1).is_some_and(|v| v.starts_with('<')) {
                i += 1;
            }
        } else if w == "[OPTIONS]" || w == "<COMMAND>" || w == "[COMMAND]" {
        } else if w.starts_with('<') {
            h.required_positionals += 1;
            max = max.map(|m| m + 1);
            if w.ends_with("...") {
                max = None;
            }
        } else if w.starts_with('[') {
            max = max.map(|m| m + 1);
            if w.ends_with("...") {
                max = None;
            }
        }
        i += 1;
    }
    h.max_positionals = max;
}

struct Checker {
    helps: HashMap<(String, Vec<String>), Result<Help, String>>,
    checked: usize,
    by_origin: BTreeMap<String, usize>,
    problems: Vec<String>,
}

impl Checker {
    fn new() -> Self {
        Self {
            helps: HashMap::new(),
            checked: 0,
            by_origin: BTreeMap::new(),
            problems: Vec::new(),
        }
    }

    fn help(&mut self, bin_name: &str, path: &[String]) -> Result<&Help, String> {
        let key = (bin_name.to_owned(), path.to_vec());
        if !self.helps.contains_key(&key) {
            let out = Command::new(bin(bin_name))
                .args(path)
                .arg("--help")
                .output()
                .expect("run --help");
            let got = if out.status.success() {
                Ok(parse_help(&String::from_utf8_lossy(&out.stdout)))
            } else {
                Err(format!(
                    "`{bin_name} {} --help` exits {}: {}",
                    path.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            };
            self.helps.insert(key.clone(), got);
        }
        self.helps[&key].as_ref().map_err(Clone::clone)
    }

    /// Checks one command: `words[0]` is the binary (any path), the rest its arguments.
    fn check(&mut self, words: &[String], origin: &str) {
        let bin_name = basename(&words[0]).to_owned();
        self.checked += 1;
        let file = origin.split(':').next().unwrap_or(origin).to_owned();
        *self.by_origin.entry(file).or_default() += 1;
        println!("  {origin}: {}", words.join(" "));
        if let Err(e) = self.check_inner(&bin_name, &words[1..]) {
            self.problems
                .push(format!("{origin}: `{}`: {e}", words.join(" ")));
        }
    }

    fn check_inner(&mut self, bin_name: &str, args: &[String]) -> Result<(), String> {
        let mut path: Vec<String> = Vec::new();
        let mut positionals = 0usize;
        let mut flags_given: Vec<String> = Vec::new();
        let mut asks_help = false;
        let mut i = 0;
        while i < args.len() {
            let w = &args[i];
            if w == "--" {
                positionals += args.len() - i - 1;
                break;
            }
            let is_flag = w.starts_with("--") || (w.starts_with('-') && w.len() == 2 && w != "-");
            if is_flag {
                let (name, inline) = match w.split_once('=') {
                    Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                    None => (w.clone(), None),
                };
                if matches!(name.as_str(), "--help" | "-h" | "--version" | "-V") {
                    asks_help = true;
                    i += 1;
                    continue;
                }
                let help = self.help(bin_name, &path)?;
                let Some(opt) = help.options.get(&name) else {
                    return Err(format!(
                        "flag {name} is not in `{bin_name} {} --help`",
                        path.join(" ")
                    ));
                };
                flags_given.push(name.clone());
                if opt.takes_value {
                    let value = match inline {
                        Some(v) => v,
                        None => {
                            i += 1;
                            args.get(i)
                                .cloned()
                                .ok_or_else(|| format!("flag {name} needs a value"))?
                        }
                    };
                    let literal = !value.is_empty()
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                    if literal && !opt.possible.is_empty() && !opt.possible.contains(&value) {
                        return Err(format!(
                            "{name} {value}: not one of [{}]",
                            opt.possible.join(", ")
                        ));
                    }
                } else if inline.is_some() {
                    return Err(format!("flag {name} takes no value"));
                }
                i += 1;
                continue;
            }
            let help = self.help(bin_name, &path)?;
            if positionals == 0 && help.subcommands.iter().any(|s| s == w) {
                path.push(w.clone());
            } else {
                positionals += 1;
            }
            i += 1;
        }
        let leaf = format!("{bin_name} {}", path.join(" "));
        let help = self.help(bin_name, &path)?;
        if asks_help {
            return Ok(());
        }
        if !help.subcommands.is_empty() {
            return Err(format!(
                "`{leaf}` needs a subcommand (one of {})",
                help.subcommands.join(", ")
            ));
        }
        for f in &help.required_flags {
            if !flags_given.contains(f) {
                return Err(format!("`{leaf}` requires {f}"));
            }
        }
        if positionals < help.required_positionals {
            return Err(format!(
                "`{leaf}` takes {} positional argument(s), the doc gives {positionals}",
                help.required_positionals
            ));
        }
        if let Some(max) = help.max_positionals {
            if positionals > max {
                return Err(format!(
                    "`{leaf}` takes at most {max} positional argument(s), the doc gives {positionals}"
                ));
            }
        }
        Ok(())
    }
}

fn basename(w: &str) -> &str {
    w.rsplit('/').next().unwrap_or(w)
}

// ---------------------------------------------------------------------------------------------------------------
// A small shell lexer: enough of sh to find simple commands in documentation.

#[derive(Debug, PartialEq)]
enum Tok {
    Word(String),
    /// `|`, `||`, `&&`, `;`, `&`, `(`, `)`, a newline: ends a simple command.
    Sep,
}

/// Splits `line` into words and separators; command substitutions `$(...)` stay inside their word and their
/// contents are returned in `nested` to be checked as commands of their own. Redirections and their targets are
/// dropped; `#` at the start of a word ends the line.
fn lex(line: &str, nested: &mut Vec<String>) -> Vec<Tok> {
    let chars: Vec<char> = line.chars().collect();
    let mut toks = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut skip_next_word = false;
    let mut i = 0;
    let flush = |toks: &mut Vec<Tok>, word: &mut String, in_word: &mut bool, skip: &mut bool| {
        if *in_word {
            if *skip {
                *skip = false;
            } else {
                toks.push(Tok::Word(std::mem::take(word)));
            }
        }
        word.clear();
        *in_word = false;
    };
    // The index just past the `)` matching the `(` at `open`.
    let matching = |open: usize| -> usize {
        let mut depth = 0;
        let mut j = open;
        let mut quote: Option<char> = None;
        while j < chars.len() {
            let c = chars[j];
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '\'' || c == '"' => quote = Some(c),
                None if c == '(' => depth += 1,
                None if c == ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return j + 1;
                    }
                }
                None => {}
            }
            j += 1;
        }
        chars.len()
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => {
                flush(&mut toks, &mut word, &mut in_word, &mut skip_next_word);
                i += 1;
            }
            '#' if !in_word => break,
            '\\' => {
                if let Some(n) = chars.get(i + 1) {
                    word.push(*n);
                }
                in_word = true;
                i += 2;
            }
            '\'' => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '\'')
                    .map_or(chars.len(), |p| i + 1 + p);
                word.extend(&chars[i + 1..end.min(chars.len())]);
                in_word = true;
                i = end + 1;
            }
            '"' => {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        word.push(chars[i + 1]);
                        i += 2;
                    } else if chars[i] == '$' && chars.get(i + 1) == Some(&'(') {
                        let end = matching(i + 1);
                        nested.push(chars[i + 2..end - 1].iter().collect());
                        word.extend(&chars[i..end]);
                        i = end;
                    } else {
                        word.push(chars[i]);
                        i += 1;
                    }
                }
                in_word = true;
                i += 1;
            }
            '$' if chars.get(i + 1) == Some(&'(') => {
                let end = matching(i + 1);
                nested.push(chars[i + 2..end.saturating_sub(1)].iter().collect());
                word.extend(&chars[i..end]);
                in_word = true;
                i = end;
            }
            '$' if chars.get(i + 1) == Some(&'{') => {
                let end = chars[i..]
                    .iter()
                    .position(|&c| c == '}')
                    .map_or(chars.len(), |p| i + p + 1);
                word.extend(&chars[i..end]);
                in_word = true;
                i = end;
            }
            '|' | ';' | '&' | '(' | ')' | '\n' => {
                flush(&mut toks, &mut word, &mut in_word, &mut skip_next_word);
                toks.push(Tok::Sep);
                i += 1;
                while i < chars.len() && matches!(chars[i], '|' | '&') {
                    i += 1;
                }
            }
            '<' if !in_word && is_placeholder(&chars[i..]) => {
                let end = chars[i..].iter().position(|&c| c == '>').unwrap_or(0) + i + 1;
                word.extend(&chars[i..end]);
                in_word = true;
                i = end;
            }
            '<' | '>' => {
                // A redirection: `>`, `>>`, `2>`, `<`, `<<WORD`; drop the operator (and a fd number before it) and
                // its target.
                if in_word && word.chars().all(|c| c.is_ascii_digit()) {
                    word.clear();
                    in_word = false;
                } else {
                    flush(&mut toks, &mut word, &mut in_word, &mut skip_next_word);
                }
                while i < chars.len() && matches!(chars[i], '<' | '>' | '&' | '-') {
                    i += 1;
                }
                skip_next_word = true;
                while i < chars.len() && chars[i] == ' ' {
                    i += 1;
                }
            }
            _ => {
                word.push(c);
                in_word = true;
                i += 1;
            }
        }
    }
    flush(&mut toks, &mut word, &mut in_word, &mut skip_next_word);
    toks
}

/// `<id>`, `<token>`, `<node>`: a documentation placeholder, not a redirection.
fn is_placeholder(rest: &[char]) -> bool {
    let Some(end) = rest.iter().position(|&c| c == '>') else {
        return false;
    };
    end > 1
        && rest[1..end]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/ ".contains(*c))
        && rest[1] != ' '
}

/// The multi-call forms as the separate binaries: `trustline ca …` is `trustline-ca …` (and so on),
/// `trustline up …` is `trustline-ca quickstart …`, and `cargo run [--release] -- <those>` runs `trustline`.
fn normalize(mut words: Vec<String>) -> Vec<String> {
    if words.first().map(String::as_str) == Some("cargo") && words.get(1).map(String::as_str) == Some("run") {
        if let Some(i) = words.iter().position(|w| w == "--") {
            words = std::iter::once("trustline".to_owned())
                .chain(words.drain(i + 1..))
                .collect();
        }
    }
    if words.first().is_some_and(|w| basename(w) == "trustline") {
        match words.get(1).map(String::as_str) {
            Some(tool @ ("ca" | "agent" | "sidecar" | "audit")) => {
                let name = format!("trustline-{tool}");
                words.splice(0..2, [name]);
            }
            Some("up") => {
                words.splice(0..2, ["trustline-ca".to_owned(), "quickstart".to_owned()]);
            }
            _ => {}
        }
    }
    words
}

/// Finds every simple command of `line` (and of its command substitutions) that runs one of [`BINS`], expanding
/// aliases defined earlier with `alias NAME='...'`.
fn commands_in(line: &str, aliases: &mut HashMap<String, Vec<String>>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut pending = vec![line.to_owned()];
    while let Some(text) = pending.pop() {
        let mut nested = Vec::new();
        let toks = lex(&text, &mut nested);
        pending.extend(nested);
        for cmd in toks.split(|t| *t == Tok::Sep) {
            let mut words: Vec<String> = cmd
                .iter()
                .filter_map(|t| match t {
                    Tok::Word(w) => Some(w.clone()),
                    Tok::Sep => None,
                })
                .collect();
            // Leading assignments and wrappers.
            while let Some(first) = words.first() {
                let assignment = first.split_once('=').is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
                if assignment
                    || matches!(
                        first.as_str(),
                        "exec" | "sudo" | "env" | "nohup" | "time" | "command"
                    )
                {
                    words.remove(0);
                } else {
                    break;
                }
            }
            if words.first().map(String::as_str) != Some("alias") {
                words = normalize(words);
            }
            let Some(first) = words.first().cloned() else {
                continue;
            };
            if first == "alias" {
                for def in &words[1..] {
                    if let Some((name, value)) = def.split_once('=') {
                        let mut ignored = Vec::new();
                        let expansion: Vec<String> = normalize(
                            lex(value, &mut ignored)
                                .into_iter()
                                .filter_map(|t| match t {
                                    Tok::Word(w) => Some(w),
                                    Tok::Sep => None,
                                })
                                .collect(),
                        );
                        if expansion.first().is_some_and(|w| BINS.contains(&basename(w))) {
                            aliases.insert(name.to_owned(), expansion);
                        }
                    }
                }
                continue;
            }
            if let Some(expansion) = aliases.get(&first) {
                let mut full = expansion.clone();
                full.extend(words.drain(1..));
                out.push(full);
            } else if BINS.contains(&basename(&first)) {
                out.push(words);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Markdown: fenced shell blocks.

/// Every command in the fenced `sh`/`bash`/`shell`/`console` blocks of `text`, with its line number.
fn markdown_commands(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut aliases = HashMap::new();
    let mut fence: Option<(String, bool)> = None; // (info string, console)
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            fence = match fence {
                Some(_) => None,
                None => {
                    let info = trimmed.trim_start_matches('`').trim().to_owned();
                    Some((info.clone(), info == "console"))
                }
            };
            i += 1;
            continue;
        }
        let Some((info, console)) = &fence else {
            i += 1;
            continue;
        };
        if !matches!(info.as_str(), "sh" | "bash" | "shell" | "console") {
            i += 1;
            continue;
        }
        let start = i + 1;
        // Join continuation lines.
        let mut logical = line.to_owned();
        while logical.ends_with('\\') && i + 1 < lines.len() {
            logical.pop();
            i += 1;
            logical.push(' ');
            logical.push_str(lines[i].trim_start());
        }
        i += 1;
        let command_text = if *console {
            match logical.trim_start().strip_prefix("$ ") {
                Some(c) => c.to_owned(),
                None => continue,
            }
        } else {
            logical
        };
        // A here-document: its body is data, not commands.
        if let Some(pos) = command_text.find("<<") {
            let tag: String = command_text[pos + 2..]
                .trim_start_matches('-')
                .trim_start()
                .trim_matches(|c| c == '\'' || c == '"')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !tag.is_empty() {
                while i < lines.len() && lines[i].trim() != tag {
                    i += 1;
                }
                i += 1;
            }
        }
        for c in commands_in(&command_text, &mut aliases) {
            out.push((start, c));
        }
    }
    out
}

fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root())
        .unwrap_or(p)
        .components()
        .filter(|c| !matches!(c, std::path::Component::ParentDir))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

// ---------------------------------------------------------------------------------------------------------------
// systemd units.

/// Sections of a unit file: name -> [(key, value)], in order. Errors name the line.
fn parse_unit(text: &str) -> Result<BTreeMap<String, Vec<(String, String)>>, String> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let n = i + 1;
        let mut line = lines[i].trim().to_owned();
        i += 1;
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            let name = line
                .strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .ok_or_else(|| format!("line {n}: bad section header {line:?}"))?;
            current = Some(name.to_owned());
            sections.entry(name.to_owned()).or_default();
            continue;
        }
        while line.ends_with('\\') && i < lines.len() {
            line.pop();
            line.push(' ');
            line.push_str(lines[i].trim());
            i += 1;
        }
        let Some(section) = &current else {
            return Err(format!("line {n}: {line:?} outside a section"));
        };
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {n}: expected Key=Value, found {line:?}"))?;
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!("line {n}: bad key {k:?}"));
        }
        sections
            .get_mut(section)
            .unwrap()
            .push((k.to_owned(), v.trim().to_owned()));
    }
    Ok(sections)
}

fn unit_value<'a>(
    sections: &'a BTreeMap<String, Vec<(String, String)>>,
    section: &str,
    key: &str,
) -> Vec<&'a str> {
    sections
        .get(section)
        .map(|kv| {
            kv.iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        })
        .unwrap_or_default()
}

fn check_units(checker: &mut Checker) {
    let dir = root().join("deploy/systemd");
    for (file, binary) in [
        ("trustline-ca.service", "trustline-ca"),
        ("trustline-agent.service", "trustline-agent"),
        ("trustline-sidecar@.service", "trustline-sidecar"),
    ] {
        let path = dir.join(file);
        let origin = rel(&path);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                checker.problems.push(format!("{origin}: {e}"));
                continue;
            }
        };
        let sections = match parse_unit(&text) {
            Ok(s) => s,
            Err(e) => {
                checker.problems.push(format!("{origin}: {e}"));
                continue;
            }
        };
        for s in ["Unit", "Service", "Install"] {
            if !sections.contains_key(s) {
                checker.problems.push(format!("{origin}: no [{s}] section"));
            }
        }
        let exec = unit_value(&sections, "Service", "ExecStart");
        if exec.len() != 1 {
            checker
                .problems
                .push(format!("{origin}: expected one ExecStart=, found {}", exec.len()));
            continue;
        }
        let cmd = exec[0].trim_start_matches(['@', '-', ':', '+', '!']);
        let mut aliases = HashMap::new();
        let found = commands_in(cmd, &mut aliases);
        match found.as_slice() {
            [words] if basename(&words[0]) == binary && words[0].starts_with('/') => {
                checker.check(words, &format!("{origin}:ExecStart"));
            }
            _ => checker.problems.push(format!(
                "{origin}: ExecStart={cmd} does not run {binary} by its absolute path"
            )),
        }
        // The hardening the operator guide describes.
        for (key, want) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
        ] {
            if unit_value(&sections, "Service", key) != [want] {
                checker
                    .problems
                    .push(format!("{origin}: [Service] {key}={want} is missing"));
            }
        }
        let user = unit_value(&sections, "Service", "User");
        if user.is_empty() || user.contains(&"root") {
            checker
                .problems
                .push(format!("{origin}: runs as root (set User= to a dedicated user)"));
        }
        if unit_value(&sections, "Service", "RuntimeDirectory").is_empty()
            && unit_value(&sections, "Service", "StateDirectory").is_empty()
        {
            checker
                .problems
                .push(format!("{origin}: no RuntimeDirectory= or StateDirectory="));
        }
        // Only the sidecar handles SIGHUP (it re-reads its policy folder); for the CA and the agent SIGHUP's
        // default action would stop the process.
        let reload = unit_value(&sections, "Service", "ExecReload");
        let hup = reload.iter().any(|r| r.contains("-HUP") || r.contains("SIGHUP"));
        if binary == "trustline-sidecar" && !hup {
            checker.problems.push(format!(
                "{origin}: ExecReload= should send SIGHUP (policy reload)"
            ));
        }
        if binary != "trustline-sidecar" && !reload.is_empty() {
            checker.problems.push(format!(
                "{origin}: ExecReload= set, but {binary} handles no reload signal (SIGHUP would stop it)"
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Kubernetes manifests.

fn containers(v: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if (k == "containers" || k == "initContainers") && x.is_array() {
                    out.extend(x.as_array().unwrap().iter().cloned());
                } else {
                    containers(x, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| containers(x, out)),
        _ => {}
    }
}

fn check_manifests(checker: &mut Checker) {
    let dir = root().join("deploy/kubernetes");
    for (file, kinds) in [
        ("agent-daemonset.yaml", &["DaemonSet", "ConfigMap"][..]),
        ("sidecar-example.yaml", &["Deployment", "ConfigMap"][..]),
    ] {
        let path = dir.join(file);
        let origin = rel(&path);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                checker.problems.push(format!("{origin}: {e}"));
                continue;
            }
        };
        let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple(&text) {
            Ok(d) => d,
            Err(e) => {
                checker.problems.push(format!("{origin}: not YAML: {e}"));
                continue;
            }
        };
        let docs: Vec<serde_json::Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
        let mut seen = Vec::new();
        for (n, d) in docs.iter().enumerate() {
            let kind = d["kind"].as_str().unwrap_or_default();
            if d["apiVersion"].as_str().is_none()
                || kind.is_empty()
                || d["metadata"]["name"].as_str().is_none()
            {
                checker.problems.push(format!(
                    "{origin}: document {n} lacks apiVersion, kind or metadata.name"
                ));
            }
            seen.push(kind.to_owned());
            // The sidecar's config and policies, and the agent's config, go through their own parsers.
            if kind == "ConfigMap" {
                for (key, value) in d["data"].as_object().into_iter().flatten() {
                    let body = value.as_str().unwrap_or_default();
                    let where_ = format!("{origin}: ConfigMap {} key {key}", d["metadata"]["name"]);
                    if key.ends_with(".yaml") || key.ends_with(".yml") {
                        if let Err(e) = trustline_sidecar::policy::PolicySet::parse_file(Path::new(key), body)
                        {
                            checker.problems.push(format!("{where_}: {e}"));
                        }
                    } else if key == "sidecar.toml" {
                        if let Err(e) = trustline_sidecar::config::Config::parse(Path::new(key), body) {
                            checker.problems.push(format!("{where_}: {e}"));
                        }
                    } else if key == "agent.toml" {
                        if let Err(e) = trustline_identity_agent::config::Config::parse(Path::new(key), body)
                        {
                            checker.problems.push(format!("{where_}: {e}"));
                        }
                    } else {
                        checker.problems.push(format!("{where_}: no check for this key"));
                    }
                }
            }
        }
        for k in kinds {
            if !seen.iter().any(|s| s == k) {
                checker
                    .problems
                    .push(format!("{origin}: no {k} (found {seen:?})"));
            }
        }
        let mut cs = Vec::new();
        for d in &docs {
            containers(d, &mut cs);
        }
        let mut ran = 0;
        for c in cs {
            let name = c["name"].as_str().unwrap_or("?").to_owned();
            let argv: Vec<String> = c["command"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(c["args"].as_array().into_iter().flatten())
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect();
            let here = format!("{origin}:container {name}");
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let argv: Vec<String> = c[probe]["exec"]["command"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect();
                if argv.first().is_some_and(|w| BINS.contains(&basename(w))) {
                    checker.check(&argv, &format!("{here} {probe}"));
                }
            }
            if argv.first().is_some_and(|w| BINS.contains(&basename(w))) {
                checker.check(&argv, &here);
                ran += 1;
            } else if argv.len() >= 3 && matches!(basename(&argv[0]), "sh" | "bash") && argv[1] == "-c" {
                let mut aliases = HashMap::new();
                for words in commands_in(&argv[2..].join(" "), &mut aliases) {
                    checker.check(&words, &here);
                    ran += 1;
                }
            }
        }
        if ran == 0 {
            checker
                .problems
                .push(format!("{origin}: no container runs a trustline binary"));
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------

#[test]
fn lexer_finds_commands_the_way_a_shell_would() {
    let mut aliases = HashMap::new();
    let found = commands_in("alias tl='target/release/trustline-ca --socket s'", &mut aliases);
    assert!(found.is_empty());
    let found = commands_in(
        "T=$(tl token generate --output json | sed 's/x/y/') && tl entry create --selector unix:uid:$(id -u) # c",
        &mut aliases,
    );
    let text: Vec<String> = found.iter().map(|w| w.join(" ")).collect();
    assert!(
        text.contains(
            &"target/release/trustline-ca --socket s entry create --selector unix:uid:$(id -u)".to_owned()
        ),
        "{text:?}"
    );
    assert!(
        text.contains(&"target/release/trustline-ca --socket s token generate --output json".to_owned()),
        "{text:?}"
    );
    let found = commands_in(
        "trustline-ca bundle show --format pem > /etc/trustline/bundle.pem 2>/dev/null",
        &mut aliases,
    );
    assert_eq!(
        found,
        vec![vec!["trustline-ca", "bundle", "show", "--format", "pem"]]
    );
    let found = commands_in("trustline-ca entry update --id <id> --x509-ttl 1h", &mut aliases);
    assert_eq!(found[0][4], "<id>");
    let found = commands_in(
        "export T=\"$(cat /b/$NODE 2>/dev/null)\"; exec trustline-agent run --config a.toml",
        &mut aliases,
    );
    assert_eq!(found, vec![vec!["trustline-agent", "run", "--config", "a.toml"]]);
}

#[test]
fn every_documented_command_is_accepted_by_its_binary() {
    let mut checker = Checker::new();
    println!("commands in the docs:");
    for f in doc_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        let origin = rel(&f);
        for (line, words) in markdown_commands(&text) {
            checker.check(&words, &format!("{origin}:{line}"));
        }
    }
    let in_docs = checker.checked;
    println!("commands in deploy/:");
    check_units(&mut checker);
    check_manifests(&mut checker);
    println!(
        "docs_commands: checked {} command lines against --help of {} subcommand paths ({in_docs} in README.md and docs/*.md, {} in deploy/)",
        checker.checked,
        checker.helps.len(),
        checker.checked - in_docs
    );
    for (file, n) in &checker.by_origin {
        println!("  {n:4}  {file}");
    }
    assert!(
        in_docs >= 40,
        "suspiciously few commands found in the docs: {in_docs}"
    );
    assert!(
        checker.problems.is_empty(),
        "{} problem(s) in the docs or deploy files:\n{}",
        checker.problems.len(),
        checker.problems.join("\n")
    );
}
