//! The report's `index.html`: the tables and the figures.

use super::{Figure, ReportInput};

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn number(value: Option<f64>) -> String {
    value.map(|v| format!("{v:.5}")).unwrap_or_else(|| "–".into())
}

/// Renders the page.
pub fn page(input: &ReportInput, figures: &[Figure]) -> String {
    let mut html = String::new();
    html.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    html.push_str(&format!("<title>Cohort report: {}</title>", escape(&input.name)));
    html.push_str("<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}tr.win{background:#e6f4e6;font-weight:bold}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}figure{margin:1.5em 0}</style></head><body>\n");
    html.push_str(&format!(
        "<h1>{}</h1>\n<p>Sweep <code>{}</code>: {}</p>\n",
        escape(&input.name),
        escape(&input.sweep_id),
        escape(&input.state)
    ));
    if !input.cv.is_empty() {
        let folds = input.cv.iter().map(|c| c.folds.len()).max().unwrap_or(0);
        html.push_str("<h2>Cross-validation</h2>\n<p>Minimum validation MSE of each fold; the config with the lowest mean wins.</p>\n<table><tr><th class=\"l\">config</th>");
        for fold in 0..folds {
            html.push_str(&format!("<th>fold {fold}</th>"));
        }
        html.push_str("<th>mean</th><th>std</th><th class=\"l\"></th></tr>\n");
        for row in &input.cv {
            html.push_str(&format!("<tr{}><td class=\"l\">{}</td>", if row.winner { " class=\"win\"" } else { "" }, escape(&row.config)));
            for fold in 0..folds {
                html.push_str(&format!("<td>{}</td>", number(row.folds.get(fold).copied().flatten())));
            }
            let pruned = input.trials.iter().any(|t| t.config == row.config && t.state == "pruned");
            let verdict = if row.winner {
                "winner"
            } else if pruned {
                "pruned: excluded"
            } else if row.mean.is_none() {
                "incomplete: excluded"
            } else {
                ""
            };
            html.push_str(&format!("<td>{}</td><td>{}</td><td class=\"l\">{verdict}</td></tr>\n", number(row.mean), number(row.std)));
        }
        html.push_str("</table>\n");
    }
    html.push_str("<h2>Trials</h2>\n<table><tr><th class=\"l\">stage</th><th class=\"l\">trial</th><th class=\"l\">config</th><th class=\"l\">state</th><th>attempts</th><th class=\"l\">last epoch</th><th class=\"l\">note</th></tr>\n");
    for trial in &input.trials {
        let last: Vec<String> = trial.last.iter().map(|(k, v)| format!("{k} {v:.5}")).collect();
        html.push_str(&format!(
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>\n",
            escape(&trial.stage),
            escape(&trial.trial),
            escape(&trial.config),
            escape(&trial.state),
            trial.attempts,
            escape(&last.join(", ")),
            escape(&trial.note)
        ));
    }
    html.push_str("</table>\n<h2>Figures</h2>\n");
    if figures.is_empty() {
        html.push_str("<p>This sweep has no data for the seed's figures yet.</p>\n");
    }
    for (file, caption) in figures {
        html.push_str(&format!(
            "<figure><img src=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>\n",
            escape(file),
            escape(caption),
            escape(caption)
        ));
    }
    html.push_str("</body></html>\n");
    html
}
