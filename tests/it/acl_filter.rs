//! An ACL that filters: wildcard subscriptions overlapping a deny entry are granted and denied topics withheld at delivery; $ topics; share group names (issue 13, item 2).
