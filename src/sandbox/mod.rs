//! `pcgate sandbox`: a local stand-in for Partner Center's billing API and its token endpoint.
