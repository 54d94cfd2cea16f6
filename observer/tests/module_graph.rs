//! The modules of the `observer` library form no import cycle: an event's path reads in one
//! direction (README "How it works"). Read from the source, so a new `use crate::...` that
//! closes a cycle fails here, naming it. No privileges needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// The library's top-level modules (files and directories of `src/`) and the other top-level
/// modules each one's non-test code names through `crate::`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = Vec::new();
    for entry in fs::read_dir(src).expect("read src/").flatten() {
        let path = entry.path();
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        // The crate root and the binary (with its CLI) sit above every module.
        if matches!(name.as_str(), "lib" | "main" | "cli") {
            continue;
        }
        if path.is_dir() {
            for inner in fs::read_dir(&path).expect("read a module directory").flatten() {
                files.push((name.clone(), inner.path()));
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push((name, path));
        }
    }
    for (module, path) in files {
        let text = fs::read_to_string(&path).expect("read a source file");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code: String =
            code.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect();
        let deps = graph.entry(module.clone()).or_default();
        for name in crate_paths(&code) {
            if name != module {
                deps.insert(name);
            }
        }
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    graph
}

/// The first path segment after every `crate::`, including each top-level name of a
/// `crate::{a, b::{c, d}, e}` group.
fn crate_paths(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut current, mut expecting) = (0, String::new(), true);
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if !current.is_empty() {
                            names.push(std::mem::take(&mut current));
                        }
                        expecting = true;
                    }
                    c if depth == 0 && expecting && (c.is_ascii_alphanumeric() || c == '_') => current.push(c),
                    _ if depth == 0 && expecting && !current.is_empty() => {
                        names.push(std::mem::take(&mut current));
                        expecting = false;
                    }
                    _ => {}
                }
            }
            if !current.is_empty() {
                names.push(current);
            }
        } else {
            names.push(rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect());
        }
    }
    names
}

/// A cycle of `graph`, if it has one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(dep, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_library_modules_import_in_one_direction() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // The event path and its vocabulary are all there.
    for module in ["decode", "classify", "attribution", "aggregate", "exposition", "pipeline", "series", "state"] {
        assert!(graph.contains_key(module), "module {module} not found in {graph:?}");
    }
    assert_eq!(
        graph["series"],
        BTreeSet::new(),
        "series keys depend on nothing: both attribution and aggregation use them"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between observer's modules: {}\nthe graph: {graph:#?}", cycle.join(" → "));
    }
}

#[test]
fn the_checker_sees_groups_and_cycles() {
    assert_eq!(crate_paths("use crate::{a, b::{c, d}, e::f};\nlet x = crate::g::h();"), ["a", "b", "e", "g"]);
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a".to_string(), BTreeSet::from(["b".to_string()])), ("b".to_string(), BTreeSet::from(["a".to_string()]))]
            .into();
    assert_eq!(find_cycle(&graph), Some(vec!["a".to_string(), "b".to_string(), "a".to_string()]));
}
