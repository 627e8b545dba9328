//! A block of lines between two marker lines in a file the user owns (ssh config, /etc/hosts): replaced or
//! removed as a whole, every line outside it kept as it was.

/// `text` with the block between `begin` and `end` replaced by `block` (appended when there is none; removed
/// when `block` is None). None when the markers are broken (a begin without an end): change nothing then.
pub fn splice(text: &str, begin: &str, end: &str, block: Option<&str>) -> Option<String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let start = lines.iter().position(|l| l.trim_end() == begin);
    let mut out = String::new();
    match start {
        Some(i) => {
            let j = i + lines[i..].iter().position(|l| l.trim_end() == end)?;
            out.extend(lines[..i].iter().copied());
            if let Some(b) = block {
                out.push_str(b);
            }
            out.extend(lines[j + 1..].iter().copied());
            // The blank line that was put before the block goes with it.
            if block.is_none() && i > 0 && out.ends_with("\n\n") && lines.get(j + 1).is_none() {
                out.pop();
            }
        }
        None => {
            out.push_str(text);
            if let Some(b) = block {
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(b);
            }
        }
    }
    Some(out)
}
