//! Output helpers: aligned tables for people, JSON for scripts.

use serde::Serialize;

/// Print `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

/// A plain aligned table: a header row and rows of cells.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// The VM table of a cluster.
pub fn vm_table(cluster: &crate::api::Cluster) -> String {
    let rows: Vec<Vec<String>> = cluster
        .vms
        .iter()
        .map(|vm| {
            vec![
                vm.name.clone(),
                vm.role.clone(),
                vm.address.clone(),
                vm.hostname.clone(),
                vm.state.as_str().to_string(),
            ]
        })
        .collect();
    table(&["VM", "ROLE", "ADDRESS", "HOSTNAME", "STATE"], &rows)
}

#[cfg(test)]
mod tests {
    #[test]
    fn aligns_columns() {
        let t = super::table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }
}
