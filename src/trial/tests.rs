//! The decisions of a try, in tables: how two outcomes compare, and how two
//! output messages differ.

use super::*;
use serde_json::json;

fn forwarded(body: Value) -> Outcome {
    Outcome {
        outcome: "forwarded".into(),
        routing_key: Some("storage".into()),
        body,
        error: None,
        printed: String::new(),
    }
}

fn raising(last: &str) -> Outcome {
    Outcome {
        outcome: "failed".into(),
        routing_key: Some("errors".into()),
        body: json!({"error": format!("Traceback (most recent call last):\n  ...\n{last}\n")}),
        error: Some(format!(
            "Traceback (most recent call last):\n  ...\n{last}\n"
        )),
        printed: String::new(),
    }
}

fn m(prop: &str, value: f64) -> Value {
    json!({"sensor_external_id": "s1", "observed_property": prop, "timestamp": 1000,
           "value": value, "unit_of_measurement": "C"})
}

#[test]
fn outcomes_compare_as_unchanged_changed_now_raises_or_fixed() {
    let out = forwarded(json!({"measurements": [m("t", 1.0)]}));
    let other = forwarded(json!({"measurements": [m("t", 2.0)]}));
    let mut rerouted = out.clone();
    rerouted.routing_key = Some("elsewhere".into());
    let table = [
        (&out, &out, Change::Unchanged),
        (&out, &other, Change::Changed),
        (&out, &rerouted, Change::Changed),
        (&out, &raising("ValueError: x"), Change::NowRaises),
        (&raising("ValueError: x"), &out, Change::Fixed),
        (
            &raising("ValueError: x"),
            &raising("ValueError: x"),
            Change::Unchanged,
        ),
        (
            &raising("ValueError: x"),
            &raising("KeyError: 'y'"),
            Change::Changed,
        ),
    ];
    for (i, (before, after, want)) in table.into_iter().enumerate() {
        assert_eq!(compare(before, after).0, want, "row {i}");
    }
}

#[test]
fn a_new_raise_says_what_is_raised_and_a_fix_what_was() {
    let out = forwarded(json!({}));
    assert_eq!(
        compare(&out, &raising("ValueError: x")).1,
        vec!["now raises: ValueError: x"]
    );
    assert_eq!(
        compare(&raising("KeyError: 'k'"), &out).1,
        vec!["raised before: KeyError: 'k'"]
    );
}

#[test]
fn measurements_are_diffed_by_identity_not_by_place() {
    let before = json!({"measurements": [m("t", 1.0), m("h", 50.0)]});
    let after = json!({"measurements": [m("h", 50.0), m("t", 1.5), m("p", 1013.0)]});
    assert_eq!(
        diff_messages(&before, &after),
        vec![
            "~ measurement t (sensor s1, at 1000): value: 1.0 → 1.5",
            "+ measurement p (sensor s1, at 1000): 1013.0 C",
        ]
    );
    let removed = json!({"measurements": [m("t", 1.0)]});
    assert_eq!(
        diff_messages(&before, &removed),
        vec!["- measurement h (sensor s1, at 1000): 50.0 C"]
    );
}

#[test]
fn metadata_and_other_fields_are_diffed_by_key() {
    let before = json!({"metadata": {"a": 1, "b": 2}, "device": null, "step_index": 1});
    let after =
        json!({"metadata": {"a": 1, "b": 3, "c": "x"}, "device": {"id": 4}, "step_index": 1});
    assert_eq!(
        diff_messages(&before, &after),
        vec![
            "~ metadata.b: 2 → 3",
            "+ metadata.c = \"x\"",
            "~ device: null → {\"id\":4}",
        ]
    );
    assert!(diff_messages(&before, &before).is_empty());
}

#[test]
fn identical_measurements_are_told_apart_by_their_place() {
    let before = json!({"measurements": [m("t", 1.0), m("t", 1.0)]});
    let after = json!({"measurements": [m("t", 1.0)]});
    assert_eq!(
        diff_messages(&before, &after),
        vec!["- measurement t (sensor s1, at 1000) #2: 1.0 C"]
    );
}

#[test]
fn the_summary_line_names_only_what_happened() {
    let s = |unchanged, changed, now_raises, fixed| Summary {
        messages: unchanged + changed + now_raises + fixed,
        unchanged,
        changed,
        now_raises,
        fixed,
    };
    let table = [
        (
            s(17, 2, 1, 0),
            "20 messages: 17 unchanged, 2 changed, 1 now raises",
        ),
        (s(20, 0, 0, 0), "20 messages: 20 unchanged"),
        (
            s(0, 0, 2, 1),
            "3 messages: 0 unchanged, 2 now raise, 1 fixed",
        ),
        (s(1, 0, 0, 0), "1 message: 1 unchanged"),
    ];
    for (summary, want) in table {
        assert_eq!(summary.line(), want);
    }
    assert!(!s(20, 0, 0, 0).anything_changed());
    assert!(s(19, 0, 0, 1).anything_changed());
}
