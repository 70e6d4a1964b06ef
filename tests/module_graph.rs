//! The modules' import graph, read from `src/`: no two modules import each other, directly or
//! through others, so the layout reads one way (sources → ledger and its backends → sinks, with
//! the listeners on top). Unit-test modules (`#[cfg(test)] mod tests`) are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every module of the crate, by path (`sources::share`), with its source.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            let module = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}::{name}")
            };
            if path.is_dir() {
                walk(&path, &module, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let key = match name.as_str() {
                    "lib" | "main" => continue,
                    "mod" => prefix.to_string(),
                    _ => module,
                };
                out.insert(key, std::fs::read_to_string(&path).expect("read module"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut out,
    );
    out
}

/// The module a path names: its longest prefix that is a module.
fn resolve(path: &str, known: &BTreeMap<String, String>) -> Option<String> {
    let segments: Vec<&str> = path.split("::").collect();
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|p| known.contains_key(p))
}

/// The modules `source` refers to with `crate::…`, grouped `use crate::{a, b::c}` included.
fn references(source: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    // Comments (doc links included) name modules without importing them.
    let code: String = source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or(source)
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let code = code.as_str();
    let mut found = BTreeSet::new();
    let path_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let item: String = item.trim().chars().take_while(|c| path_char(*c)).collect();
                found.extend(resolve(item.trim_end_matches("::"), known));
            }
        } else {
            let path: String = rest.chars().take_while(|c| path_char(*c)).collect();
            found.extend(resolve(path.trim_end_matches("::"), known));
        }
    }
    found
}

/// Groups of two or more modules that reach each other.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for next in edges.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        edges.keys().map(|m| (m, reach(m))).collect();
    let mut groups: BTreeSet<Vec<String>> = BTreeSet::new();
    for (m, r) in &reaches {
        let group: Vec<String> = reaches
            .iter()
            .filter(|(o, ro)| o == &m || (r.contains(**o) && ro.contains(*m)))
            .map(|(o, _)| (*o).clone())
            .collect();
        if group.len() > 1 {
            groups.insert(group);
        }
    }
    groups.into_iter().collect()
}

#[test]
fn no_module_imports_another_that_imports_it() {
    let known = modules();
    if std::env::var_os("SHOW_EDGES").is_some() {
        for (m, source) in &known {
            eprintln!("{m} -> {:?}", references(source, &known));
        }
    }
    assert!(known.contains_key("gate") && known.contains_key("sinks::traefik_file"));
    let edges: BTreeMap<String, BTreeSet<String>> = known
        .iter()
        .map(|(m, source)| {
            let mut refs = references(source, &known);
            refs.remove(m);
            (m.clone(), refs)
        })
        .collect();
    let found = cycles(&edges);
    assert!(
        found.is_empty(),
        "these groups of modules import each other in a circle: {found:?} (SHOW_EDGES=1 prints every import)"
    );
}

#[test]
fn the_reader_sees_grouped_imports_and_cycles() {
    let known: BTreeMap<String, String> = ["a", "b", "c::d"]
        .iter()
        .map(|m| (m.to_string(), String::new()))
        .collect();
    assert_eq!(
        references("use crate::{a, c::d::X};\nfn f() { crate::b::g() }", &known),
        ["a", "b", "c::d"].iter().map(|s| s.to_string()).collect()
    );
    let edge = |from: &str, to: &[&str]| {
        (
            from.to_string(),
            to.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
        )
    };
    let edges: BTreeMap<_, _> = [edge("a", &["b"]), edge("b", &["a"]), edge("c::d", &["a"])]
        .into_iter()
        .collect();
    assert_eq!(cycles(&edges), vec![vec!["a".to_string(), "b".to_string()]]);
}
