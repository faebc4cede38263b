//! The roster as it goes on the wire (RFC 6121 §2), and its cap; read by the roster
//! IQs and by the subscription handling alike.

use impmesh_store::RosterItem;

use crate::xml::escape;

/// Roster items a user may keep (ejabberd and Prosody have similar caps).
pub(crate) const MAX_ROSTER_ITEMS: usize = 1000;

/// One `<item/>` of a roster result or push.
pub(crate) fn roster_item_xml(item: &RosterItem, removed: bool) -> String {
    let mut out = format!("<item jid='{}'", escape(&item.contact));
    if removed {
        out.push_str(" subscription='remove'/>");
        return out;
    }
    if let Some(name) = &item.name {
        out.push_str(&format!(" name='{}'", escape(name)));
    }
    out.push_str(&format!(" subscription='{}'", item.subscription.as_str()));
    if item.ask {
        out.push_str(" ask='subscribe'");
    }
    if item.groups.is_empty() {
        out.push_str("/>");
    } else {
        out.push('>');
        for g in &item.groups {
            out.push_str(&format!("<group>{}</group>", escape(g)));
        }
        out.push_str("</item>");
    }
    out
}
