//! Selectors (`type:value`), as operators and the CA's database give them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use trustline_identity::Selector;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(sel) = s.parse::<Selector>() {
        // What is accepted prints back to something that parses to the same selector.
        let again: Selector = sel.to_string().parse().expect("a selector's text parses again");
        assert_eq!(again, sel);
        let _ = trustline_identity::selector_set_key(&[sel.clone(), again]);
        let _ = Selector::new(sel.kind(), sel.value()).expect("kind and value of a valid selector");
    }
});
